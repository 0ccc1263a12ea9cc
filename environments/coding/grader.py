"""The coding env's grader: runs in the sandbox, in two processes that share nothing but data.

    python3 -I -c SOURCE grade              stdin: {"nonce", "prelude", "test", "entry_point", "source"}
    python3 -I -c SOURCE serve R W ENTRY    started by `grade` (SOURCE from its stdin): runs solution.py

The *grader* process holds the hidden tests and the verdict; the solution never runs in it.
It makes itself non-dumpable first (no process of its uid may read its memory or open its
fds), reads its stdin, runs the task's own prompt (helpers the tests use) and tests, and calls
`check(candidate)` with a proxy: each call sends the arguments over a pipe to the *solution*
process and gets back plain data (None, bool, int, float, complex, str, bytes and lists,
tuples, dicts, sets of them, exact types only), rebuilt here, so nothing the solution defines
(an object equal to everything, a patched builtin, a trace function) reaches the grader. The
solution's process has no copy of the nonce, the tests or the grader's stdout (its own stdout
goes nowhere); all it controls is what its function returns. The verdict is one line on the
grader's stdout, `KPOP-VERDICT <nonce> pass|fail`, with exit status 0 only for a pass.

Standard library only: it runs on the sandbox's python3. `-I` keeps the writable workdir off
sys.path, so files the solution plants are never imported by the grader.
"""

import builtins
import json
import math
import os
import subprocess
import sys
import traceback

MAX_LINE = 16 << 20  # one call's arguments or result
MAX_DEPTH = 64


# -- plain data over a pipe: JSON, with tagged objects for what JSON lacks -----------------------
def enc(x, depth=0):
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    t = type(x)
    if x is None or t in (bool, int, str):
        return x
    if t is float:
        return x if math.isfinite(x) else {"x": repr(x)}
    if t is list:
        return [enc(v, depth + 1) for v in x]
    if t is tuple:
        return {"t": [enc(v, depth + 1) for v in x]}
    if t is dict:
        return {"d": [[enc(k, depth + 1), enc(v, depth + 1)] for k, v in x.items()]}
    if t in (set, frozenset):
        return {"s" if t is set else "f": [enc(v, depth + 1) for v in x]}
    if t is bytes:
        return {"b": x.hex()}
    if t is complex:
        return {"c": [enc(x.real), enc(x.imag)]}
    raise TypeError(f"a {t.__name__} cannot cross to the grader (plain data only)")


def dec(x, depth=0):
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    t = type(x)
    if x is None or t in (bool, int, float, str):
        return x
    if t is list:
        return [dec(v, depth + 1) for v in x]
    if t is dict and len(x) == 1:
        (tag, v), = x.items()
        if tag == "x" and v in ("inf", "-inf", "nan"):
            return float(v)
        if tag in "tsf" and type(v) is list:
            items = [dec(i, depth + 1) for i in v]
            return tuple(items) if tag == "t" else set(items) if tag == "s" else frozenset(items)
        if tag == "d" and type(v) is list and all(type(p) is list and len(p) == 2 for p in v):
            return {dec(k, depth + 1): dec(val, depth + 1) for k, val in v}
        if tag == "b" and type(v) is str:
            return bytes.fromhex(v)
        if tag == "c" and type(v) is list and len(v) == 2:
            re, im = dec(v[0], depth + 1), dec(v[1], depth + 1)
            if type(re) is float and type(im) is float:
                return complex(re, im)
    raise ValueError(f"not plain data: {str(x)[:80]}")


def send(f, obj):
    f.write(json.dumps(obj).encode() + b"\n")
    f.flush()


def recv(f):
    line = f.readline(MAX_LINE + 1)
    if not line.endswith(b"\n"):
        raise EOFError("the solution's process ended or sent too much")
    return json.loads(line)


# -- the solution's process ----------------------------------------------------------------------
def serve(rfd, wfd, entry_point):
    calls, results = os.fdopen(rfd, "rb"), os.fdopen(wfd, "wb")
    try:
        ns = {"__name__": "__main__"}
        with open("solution.py") as f:
            exec(compile(f.read(), "solution.py", "exec"), ns)
        fn = ns[entry_point]
    except BaseException as exc:
        traceback.print_exc()
        send(results, ["raise", type(exc).__name__, str(exc)[:500]])
        return
    send(results, ["ready"])
    while True:
        try:
            args, kwargs = dec(recv(calls))
        except EOFError:
            return
        try:
            reply = ["ok", enc(fn(*args, **kwargs))]
        except BaseException as exc:
            reply = ["raise", type(exc).__name__, str(exc)[:500]]
        send(results, reply)


# -- the grader's process -----------------------------------------------------------------------
PLAIN_ERRORS = (ArithmeticError, LookupError, ValueError, TypeError, AttributeError, NameError, RuntimeError,
                AssertionError)


class SolutionFailed(Exception):
    """The solution raised, returned something that is not plain data, or its process is gone."""


class Candidate:
    """Stands for the solution's function inside the tests: calls go to the other process."""

    def __init__(self, calls, results):
        self.calls, self.results = calls, results

    def __call__(self, *args, **kwargs):
        send(self.calls, enc([list(args), kwargs]))
        return answer(recv(self.results))


def answer(reply):
    kind = reply[0] if type(reply) is list and reply else None
    if kind == "ok" and len(reply) == 2:
        return dec(reply[1])
    if kind == "raise" and len(reply) == 3:
        name, message = str(reply[1]), str(reply[2])
        cls = getattr(builtins, name, None)
        # a test may expect, say, a ValueError; never StopIteration and the like, which would end
        # a loop of the test's (`all(map(candidate, xs))`) as if every case had passed
        if isinstance(cls, type) and issubclass(cls, PLAIN_ERRORS):
            raise cls(message)
        raise SolutionFailed(f"{name}: {message}")
    raise SolutionFailed(f"malformed reply {str(reply)[:80]}")


def protect_self():
    import ctypes

    libc = ctypes.CDLL(None)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    if libc.prctl(3, 0, 0, 0, 0) != 0:  # PR_GET_DUMPABLE
        raise RuntimeError("the grader cannot make itself non-dumpable")


def grade():
    protect_self()
    spec = json.loads(sys.stdin.buffer.read())
    nonce = spec["nonce"]
    # the verdict gets stdout to itself: whatever the tests print goes to stderr
    verdict = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    ok = False
    try:
        ns = {"__name__": "kpop_hidden_tests"}
        exec(compile(spec["prelude"], "task_prompt", "exec"), ns)
        exec(compile(spec["test"], "hidden_tests", "exec"), ns)
        call_r, call_w = os.pipe()
        result_r, result_w = os.pipe()
        subprocess.Popen(
            [sys.executable, "-I", "-c", spec["source"], "serve", str(call_r), str(result_w), spec["entry_point"]],
            pass_fds=(call_r, result_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        os.close(call_r)
        os.close(result_w)
        calls, results = os.fdopen(call_w, "wb"), os.fdopen(result_r, "rb")
        first = recv(results)
        if first != ["ready"]:
            answer(first)
            raise SolutionFailed("the solution's process did not start")
        candidate = Candidate(calls, results)
        ns[spec["entry_point"]] = candidate
        ns["check"](candidate)
        ok = True
    except BaseException:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    verdict.write(f"KPOP-VERDICT {nonce} {'pass' if ok else 'fail'}\n")
    verdict.flush()
    os._exit(0 if ok else 1)  # at once: no cleanup that waits on the solution's process


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        grade()
