"""The process that runs as PID 1 inside every sandbox (both backends).

The host starts it once per sandbox (`python3 -I -S -c SOURCE CONFIG_JSON`) and then talks to
it over its stdin/stdout, one JSON object per line each way. A warm exec is then one fork+exec
here instead of a fresh bwrap or `docker exec`, which is what makes pooled sandboxes fast.

Being PID 1 of its own PID namespace matters: code in the sandbox cannot signal it, `kill(-1)`
reaches every other process in the sandbox (so nothing outlives an exec), and if it exits the
kernel kills everything else. EOF on stdin means the host is gone: kill everything and exit.

Standard library only, and nothing from the host's Python: it runs on the sandbox's python3.

The control channel must stay out of reach of the code we run, which has our uid:
- we make ourselves non-dumpable first, so no process in the sandbox can open /proc/1/fd/*
  (our stdin/stdout), read /proc/1/mem or ptrace us;
- every line each way is signed: the host's first line is a fresh 32-byte key (no process but
  us exists yet to read it), then each line is `HMAC-SHA256(key, dir + body) hex + " " + body`
  with a sequence number in the body. A request we did not get from the host (bad signature,
  wrong sequence) means the channel is breached: we kill everything and exit. The host treats
  a reply it cannot verify the same way, so a forged or replayed line can never become a result;
- a process of our uid can still lower our rlimits or nice value (prlimit needs no more), which
  every later process would inherit: before each request we check them and refuse to go on
  ("tainted") if they changed, and the host discards the sandbox.

Requests:  {"op": "exec", "argv": [...], "env": {...}, "cwd": str, "stdin": b64, "timeout": s}
           {"op": "write", "path": str, "data": b64}   {"op": "read", "path": str}
           {"op": "reset"}                              {"op": "ping"}
Replies:   {"ok": true, ...} or {"ok": false, "error": kind, "message": str}; each with "seq".
"""

import base64
import ctypes
import hashlib
import hmac
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import time

CFG = json.loads(sys.argv[1])
WORKDIR = CFG["workdir"]
CHUNK = 1 << 16
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
IPC_RMID = 0
LIBC = ctypes.CDLL(None, use_errno=True)
# every limit a process can lower on another of its uid (and so on us)
RLIMITS = [getattr(resource, n) for n in dir(resource) if n.startswith("RLIMIT_")]


class Channel:
    """Signed lines: `mac hex` SP body LF; the MAC covers a direction byte and the body."""

    def __init__(self, key):
        self.key = key
        self.seq = 0  # of the last request accepted; the hello is reply 0

    def mac(self, direction, body):
        return hmac.new(self.key, direction + body, hashlib.sha256).hexdigest().encode()

    def send(self, msg):
        msg["seq"] = self.seq
        body = json.dumps(msg).encode()
        data = self.mac(b"r", body) + b" " + body + b"\n"
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]

    def parse(self, line):
        """The request on `line`, or None if the host did not send it."""
        mac, _, body = line.partition(b" ")
        if not hmac.compare_digest(mac, self.mac(b"q", body)):
            return None
        req = json.loads(body)
        if req.get("seq") != self.seq + 1:
            return None
        self.seq += 1
        return req


def read_lines():
    """Lines from fd 0, unbuffered: during an exec fd 0 is polled for EOF directly."""
    buf = b""
    while True:
        nl = buf.find(b"\n")
        if nl >= 0:
            line, buf = buf[:nl], buf[nl + 1:]
            yield line
            continue
        chunk = os.read(0, CHUNK)
        if not chunk:
            return
        buf += chunk


def reap():
    """Collect exited children (orphans of the sandbox are re-parented to us). -> {pid: status}"""
    done = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done[pid] = status


def kill_all():
    """SIGKILL every process in the sandbox but us (we are PID 1, so -1 excludes us)."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_all_and_wait(wait_s=2.0):
    """kill_all, then reap until no process but us is left: zombies still count against the
    pids limit, so the next exec would otherwise start in a sandbox that looks full."""
    deadline = time.monotonic() + wait_s
    while True:
        kill_all()
        reap()
        if not other_pids() or time.monotonic() > deadline:
            return
        time.sleep(0.001)


def die():
    kill_all()
    os._exit(0)


def oom_kills():
    """The sandbox cgroup's OOM-kill counter (v1 memory.oom_control / v2 memory.events)."""
    for path in CFG["oom_files"]:
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            continue
    return 0


def make_undumpable():
    """Processes of our uid may no longer open /proc/1/fd/*, read /proc/1/mem or ptrace us.
    (Our children get dumpable back when they exec, so their own /proc files stay theirs.)"""
    LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    if LIBC.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
        sys.stderr.write("kpop supervisor: cannot make itself non-dumpable\n")
        os._exit(2)


def own_state():
    """What sandboxed code could change in us from outside: our rlimits and nice value."""
    return [resource.getrlimit(r) for r in RLIMITS] + [os.getpriority(os.PRIO_PROCESS, 0)]


def remove_sysv_ipc():
    """SysV shared memory, queues and semaphores outlive the processes that made them."""
    for kind in ("shm", "msg", "sem"):
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                ids = [int(line.split()[1]) for line in list(f)[1:] if line.strip()]
        except OSError:
            continue
        for ipc_id in ids:
            if kind == "shm":
                LIBC.shmctl(ipc_id, IPC_RMID, None)
            elif kind == "msg":
                LIBC.msgctl(ipc_id, IPC_RMID, None)
            else:
                LIBC.semctl(ipc_id, 0, IPC_RMID)


def limit_self():
    """Limits every process inherits: set once on the supervisor, so a spawn needs no
    preexec hook (which would force a slow fork of this Python process)."""
    fsize = CFG["file_size_mb"] << 20
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if CFG.get("rlimit_as_mb"):
        mem = CFG["rlimit_as_mb"] << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    if CFG.get("rlimit_nproc"):
        n = CFG["rlimit_nproc"] + 1  # + the supervisor
        resource.setrlimit(resource.RLIMIT_NPROC, (n, n))


def limit_child(pid):
    """Per-process limits, applied right after the spawn: CPU time counts from the child's
    start whenever the limit is set, so applying it a moment late loses nothing."""
    cpu = max(1, int(CFG["cpu_time_s"] + 0.999))
    try:
        resource.prlimit(pid, resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:  # the OOM killer takes user code first
            f.write("1000")
    except OSError:  # already gone
        pass


def in_workdir(path):
    full = os.path.realpath(os.path.join(WORKDIR, path))
    if os.path.commonpath([full, WORKDIR]) != WORKDIR:
        raise PermissionError(f"{path!r} is outside the workdir {WORKDIR}")
    return full


def do_exec(req):
    argv, cap = req["argv"], CFG["max_output_bytes"]
    cwd = os.path.join(WORKDIR, req.get("cwd") or "")
    stdin = base64.b64decode(req.get("stdin") or "")
    reap()
    oom_before = oom_kills()
    start = time.monotonic()
    deadline = start + req["timeout"]
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=req["env"], cwd=cwd, start_new_session=True,
        )
        limit_child(proc.pid)
    except OSError as exc:  # missing program or cwd: the shell's conventions
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        return {"ok": True, "exit_code": code, "stdout": "", "timed_out": False, "oom_killed": False,
                "stderr": base64.b64encode(f"{argv[0]}: {exc}\n".encode()).decode(),
                "duration_s": time.monotonic() - start}

    collected = (bytearray(), bytearray())
    out = {proc.stdout.fileno(): collected[0], proc.stderr.fileno(): collected[1]}
    poll = select.poll()
    poll.register(0, 0)  # HUP/ERR only: the host never writes during an exec
    for fd in out:
        poll.register(fd, select.POLLIN)
    pending = memoryview(stdin)
    stdin_fd = proc.stdin.fileno()
    if pending:
        os.set_blocking(stdin_fd, False)
        poll.register(stdin_fd, select.POLLOUT)
    else:
        proc.stdin.close()
    pidfd = os.pidfd_open(proc.pid)
    poll.register(pidfd, select.POLLIN)
    status, timed_out = None, False
    while out or status is None:
        wait_ms = max(0, int((deadline - time.monotonic()) * 1000) + 1)
        for fd, ev in poll.poll(wait_ms if status is None else 1000):
            if fd == 0:
                die()
            elif fd == pidfd:
                poll.unregister(pidfd)
                os.close(pidfd)
                status = reap().get(proc.pid)
                if status is None:  # pidfd is readable before the zombie is reapable on some kernels
                    status = os.waitpid(proc.pid, 0)[1]
                proc.returncode = 0  # reaped by us; keeps Popen.__del__ from waiting again
                kill_all()  # leftovers would hold the pipes open and outlive the exec
            elif fd == stdin_fd:
                try:
                    pending = pending[os.write(fd, pending[:CHUNK]):]
                except (BrokenPipeError, BlockingIOError) as exc:
                    if isinstance(exc, BrokenPipeError):
                        pending = pending[:0]
                if not pending:
                    poll.unregister(fd)
                    proc.stdin.close()
            else:
                data = os.read(fd, CHUNK)
                if not data:
                    poll.unregister(fd)
                    del out[fd]
                    continue
                buf = out[fd]
                buf += data[: max(0, cap - len(buf))]
        if status is None and time.monotonic() >= deadline and not timed_out:
            timed_out = True
            kill_all()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if not stream.closed:
            stream.close()
    kill_all_and_wait()
    if os.WIFSIGNALED(status):
        code = 128 + os.WTERMSIG(status)
    else:
        code = os.WEXITSTATUS(status)
    return {
        "ok": True, "exit_code": code, "timed_out": timed_out,
        "oom_killed": oom_kills() > oom_before,
        "stdout": base64.b64encode(collected[0]).decode(),
        "stderr": base64.b64encode(collected[1]).decode(),
        "duration_s": time.monotonic() - start,
    }


def do_write(req):
    full = in_workdir(req["path"])
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as f:
        f.write(base64.b64decode(req["data"]))
    return {"ok": True}


def do_read(req):
    with open(in_workdir(req["path"]), "rb") as f:
        return {"ok": True, "data": base64.b64encode(f.read()).decode()}


def do_reset(_req):
    kill_all_and_wait()
    remove_sysv_ipc()
    for top in CFG["scratch"]:
        for name in os.listdir(top) if os.path.isdir(top) else ():
            path = os.path.join(top, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass
    return {"ok": True}


def other_pids():
    me = str(os.getpid())
    return [p for p in os.listdir("/proc") if p.isdigit() and p != me]


OPS = {"exec": do_exec, "write": do_write, "read": do_read, "reset": do_reset,
       "ping": lambda _req: {"ok": True}}


def main():
    make_undumpable()
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # Python's own SIGINT handler would let a process of our uid raise KeyboardInterrupt in us;
    # a no-op handler (unlike SIG_IGN) is not inherited across exec by what we run.
    signal.signal(signal.SIGINT, lambda *_: None)
    limit_self()
    lines = read_lines()
    key = next(lines, b"")
    if len(key) != 64:
        os._exit(2)
    chan = Channel(bytes.fromhex(key.decode()))
    expected = own_state()
    chan.send({"ok": True, "ready": True, "pid": os.getpid()})
    for line in lines:
        req = chan.parse(line)
        if req is None:  # not from the host: nothing on this channel can be trusted any more
            die()
        try:
            if own_state() != expected:
                reply = {"ok": False, "error": "tainted",
                         "message": "sandboxed code changed the supervisor's rlimits or priority"}
            else:
                reply = OPS[req["op"]](req)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            reply = {"ok": False, "error": "not_found", "message": str(exc)}
        except PermissionError as exc:
            reply = {"ok": False, "error": "permission", "message": str(exc)}
        except Exception as exc:  # a bad request must not take the sandbox down
            reply = {"ok": False, "error": "internal", "message": f"{type(exc).__name__}: {exc}"}
        chan.send(reply)
    die()


if __name__ == "__main__":
    main()
