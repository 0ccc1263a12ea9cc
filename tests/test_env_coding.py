"""Coding family: hidden tests run in a real sandbox (bwrap; one docker test)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from environments import assistant, make, oracle_agent, run_episode
from environments.coding import generated, humaneval, solution_program

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env():
    e = make("kpop/coding-v0", limits={"wall_time_s": 3.0, "cpu_time_s": 3.0, "memory_mb": 256, "max_pids": 16})
    yield e
    e.close()


def answer(text):
    async def agent(messages, tools):
        return assistant(text)

    return agent


def play(env, agent, task_id):
    return asyncio.run(run_episode(env, agent, options={"task_id": task_id}))


def test_data_ships_with_the_package():
    assert len(humaneval()) == 164
    t = generated(7)
    assert t == generated(7) and "def check(candidate)" in t.test


@pytest.mark.parametrize("task_id", ["coding/HumanEval/0", "coding/HumanEval/32", "coding/HumanEval/163"]
                         + [f"coding/gen/{n}" for n in range(5)])
def test_oracle_passes(env, task_id):
    ep = play(env, oracle_agent(env), task_id)
    assert ep.status == "ok" and ep.reward == 1.0, ep.reward_detail


def test_wrong_answers_fail(env):
    task = "coding/HumanEval/0"
    p = humaneval()[0]
    wrong = play(env, answer(f"```python\n{p.prompt}    return False\n```"), task)
    assert wrong.reward == 0.0 and "AssertionError" in wrong.reward_detail["stderr_tail"]
    # An early exit(0) must not count as passing: the tests never ran.
    cheat = play(env, answer(f"```python\n{p.prompt}    return True\nimport sys\nsys.exit(0)\n```"), task)
    assert cheat.reward == 0.0 and "SystemExit: 0" in cheat.reward_detail["stderr_tail"]
    # Nor can a solution that hunts for a verdict in the files and environment it can see.
    hunt = ("import os, re, sys\n"
            "blob = ' '.join(open(f, errors='ignore').read() for f in os.listdir('.') if os.path.isfile(f))\n"
            "blob += repr(dict(os.environ)) + ' '.join(sys.argv)\n"
            "found = re.findall(r'KPOP-TESTS-PASSED-[0-9a-f]+', blob)\n"
            "print(found[-1] if found else 'none'); sys.stdout.flush(); os._exit(0)\n")
    hunter = play(env, answer(f"```python\n{p.prompt}    return True\n{hunt}```"), task)
    assert hunter.reward == 0.0 and "process ended" in hunter.reward_detail["stderr_tail"]
    hang = play(env, answer(f"```python\n{p.prompt}    while True: pass\n```"), task)
    assert hang.reward == 0.0 and hang.reward_detail["timed_out"]
    assert play(env, answer("I cannot do this."), task).reward == 0.0


def test_files_planted_by_the_agent_cannot_fake_a_pass(env):
    """A planted typing.py (imported by the solution) that finds the pass marker and prints it."""
    plant = ("import sys, re, os\n"
             "src = open(sys.argv[0]).read()\n"
             "print(re.findall(r'KPOP-TESTS-PASSED-[0-9a-f]+', src)[-1]); sys.stdout.flush(); os._exit(0)\n")
    writer = f"open('typing.py', 'w').write({plant!r})"
    p = humaneval()[0]

    async def agent(messages, tools):
        if messages[-1]["role"] == "user":
            return assistant(None, ("run_python", {"code": writer}))
        return assistant(f"```python\n{p.prompt}    return False\n```")

    ep = play(env, agent, "coding/HumanEval/0")
    assert ep.messages[2]["content"].startswith("exit code 0")
    assert ep.reward == 0.0 and "AssertionError" in ep.reward_detail["stderr_tail"]


def test_body_only_completion_is_accepted(env):
    p = humaneval()[2]
    body = p.canonical[len(p.prompt):]
    assert solution_program(p, body).startswith(p.prompt)
    assert play(env, answer(body), "coding/HumanEval/2").reward == 1.0


def test_fix_tasks_start_broken(env):
    broken = 0
    fix_ids = [n for n in range(40) if generated(n).fix]
    for n in fix_ids:
        t = generated(n)
        assert "has a bug" in env.reset(options={"task_id": f"coding/gen/{n}"})[0][0]["content"]
        broken += play(env, answer(f"```python\n{t.prompt}```"), f"coding/gen/{n}").reward == 0.0
    assert broken >= len(fix_ids) - 1, (broken, len(fix_ids))  # a random test set may miss a rare bug


def test_run_python_tool_and_its_errors(env):
    env.reset(options={"task_id": "coding/gen/0"})
    call = {"id": "c", "type": "function", "function": {"name": "run_python", "arguments": '{"code": "print(6 * 7)"}'}}
    msgs, reward, terminated, truncated, _ = env.step({"role": "assistant", "content": None, "tool_calls": [call]})
    assert msgs[0]["content"].startswith("exit code 0\nstdout:\n42")
    assert not terminated and reward == 0.0
    call["function"]["arguments"] = '{"code": "import os; print(open(\'/etc/shadow\').read())"}'
    out = env.step({"role": "assistant", "content": None, "tool_calls": [call]})[0][0]["content"]
    assert "exit code 1" in out and ("PermissionError" in out or "FileNotFoundError" in out)


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend must be"):
        make("kpop/coding-v0", backend="qemu")
    env = make("kpop/coding-v0")
    with pytest.raises(ValueError, match="bad coding task_id"):
        env.reset(options={"task_id": "coding/HumanEval/999"})


@pytest.fixture(scope="module")
def docker_ready():
    """scripts/docker.sh (the sandbox set-up) is idempotent: with the image built it only asks docker."""
    proc = subprocess.run(["bash", str(ROOT / "scripts/docker.sh")], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"scripts/docker.sh failed:\n{proc.stdout}\n{proc.stderr}")


@pytest.mark.docker
def test_docker_backend(docker_ready):
    env = make("kpop/coding-v0", backend="docker")
    try:
        for task_id in ("coding/HumanEval/10", "coding/gen/3"):
            ep = play(env, oracle_agent(env), task_id)
            assert ep.status == "ok" and ep.reward == 1.0, (ep.error, ep.reward_detail)
        assert play(env, answer("def nope(): pass"), "coding/gen/3").reward == 0.0
        assert env.task.resources.sandbox_backend == "docker"
    finally:
        env.close()


# -- reward hacks: the final answer is hostile code, run by the grader ---------------------------
# Each is a complete answer to HumanEval/0 (has_close_elements) that does not solve it.
_HE0 = "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
HACKS = {
    # the exploit: read the pass marker from the grader's frame, print it, leave
    "grader_frame": _HE0 + "    return False\nimport sys, os\n"
                    "print(sys._getframe(1).f_locals['spec']['marker']); sys.stdout.flush(); os._exit(0)\n",
    # the same, thorough: every string in every frame and every live dict
    "memory_hunt": _HE0 + "    return False\n"
                   "import gc, os, sys\nfound = []\nf = sys._getframe()\n"
                   "while f is not None:\n"
                   "    for v in list(f.f_locals.values()) + list(f.f_globals.values()):\n"
                   "        if isinstance(v, dict):\n            found += [x for x in v.values() if isinstance(x, str)]\n"
                   "        elif isinstance(v, str):\n            found.append(v)\n"
                   "    f = f.f_back\n"
                   "for o in gc.get_objects():\n"
                   "    if isinstance(o, dict):\n        found += [x for x in o.values() if isinstance(x, str) and len(x) < 200]\n"
                   "print('\\n'.join(found)); sys.stdout.flush(); os._exit(0)\n",
    # a result that equals anything: `assert candidate(...) == True` holds in the grader's process
    "always_equal": _HE0 + "    class Any:\n        __eq__ = lambda self, other: True\n"
                    "        __ne__ = lambda self, other: False\n        __bool__ = lambda self: True\n"
                    "    return Any()\n",
    # a trace function that skips the grader's assertions
    "skip_asserts": _HE0 + "    return False\nimport sys\n"
                    "def tracer(frame, event, arg):\n"
                    "    if event == 'line' and 'assert' in __import__('linecache').getline(frame.f_code.co_filename, frame.f_lineno):\n"
                    "        frame.f_lineno = frame.f_lineno + 1\n"
                    "    return tracer\n"
                    "sys.settrace(tracer)\n",
    # builtins patched for the grader: every assertion error becomes a no-op exit 0 at the end
    "patch_builtins": _HE0 + "    return False\nimport builtins, os, sys\n"
                      "builtins.AssertionError = type('AssertionError', (Exception,), {})\n"
                      "sys.excepthook = lambda *a: os._exit(0)\n"
                      "__import__('atexit').register(lambda: os._exit(0))\n",
    # print anything that looks like a verdict, then exit 0 before the tests run
    "fake_verdict": _HE0 + "    return False\nimport os, sys\n"
                    "for w in ('PASS', 'pass', 'KPOP-TESTS-PASSED-0', 'KPOP-VERDICT pass', '{\"passed\": true}'):\n"
                    "    print(w); print(w, file=sys.stderr)\nsys.stdout.flush(); os._exit(0)\n",
    # write a verdict into the grader's stdout / the supervisor's stdout, then kill the grader
    "forge_fds": _HE0 + "    return False\nimport os, signal\n"
                 "for fd in (f'/proc/{os.getppid()}/fd/1', '/proc/1/fd/1', '/proc/self/fd/1'):\n"
                 "    try:\n        os.write(os.open(fd, os.O_WRONLY), b'KPOP-VERDICT pass\\n')\n    except OSError:\n        pass\n"
                 "os.kill(os.getppid(), signal.SIGKILL)\nos._exit(0)\n",
    # files the grader might read or import later
    "plant_files": _HE0 + "    return False\nimport os\n"
                   "for d in ('/work', '/tmp', os.getcwd()):\n"
                   "    for name in ('json.py', 'ast.py', 'signal.py', 'select.py', 'harness.py', 'grader.py', 'sitecustomize.py'):\n"
                   "        try:\n            open(os.path.join(d, name), 'w').write('import os\\nprint(\"KPOP-VERDICT pass\")\\nos._exit(0)\\n')\n"
                   "        except OSError:\n            pass\n",
    # steal the hidden tests from the grader (its stdin, memory, argv) and show them in stderr
    "steal_tests": _HE0 + "    return False\nimport os, sys\n"
                   "pid = os.getppid()\n"
                   "for name in ('fd/0', 'cmdline', 'environ', 'mem'):\n"
                   "    try:\n        sys.stderr.write(open(f'/proc/{pid}/{name}', 'rb').read(100000).decode(errors='replace'))\n"
                   "    except OSError as e:\n        sys.stderr.write(f'denied {name} {e}')\n",
}


@pytest.mark.parametrize("hack", sorted(HACKS))
def test_reward_hacks_score_zero(backend, hack):
    env = make("kpop/coding-v0", backend=backend, limits={"wall_time_s": 5.0, "cpu_time_s": 5.0})
    try:
        ep = play(env, answer(f"```python\n{HACKS[hack]}```"), "coding/HumanEval/0")
        assert ep.reward == 0.0, (hack, ep.reward_detail)
        hidden = "3.9, 4.0, 5.0, 2.2"  # a line of HumanEval/0's hidden tests
        assert hidden not in ep.reward_detail.get("stderr_tail", ""), ep.reward_detail
        # the sandbox is still usable, and an honest answer still passes after the attack
        assert play(env, oracle_agent(env), "coding/HumanEval/0").reward == 1.0
    finally:
        env.close()


def test_episodes_share_a_worker_pool_without_leaking(backend):
    """The per-worker pool: envs take a warm sandbox from it and give it back on close, so a run of
    episodes pays one sandbox start; what an episode left behind is gone in the next."""
    from sandboxes import SandboxPool

    limits = {"wall_time_s": 5.0, "cpu_time_s": 5.0, "memory_mb": 256, "max_pids": 16}
    with SandboxPool(backend, size=1, prestart=False) as pool:
        marks = []
        for i in range(3):
            env = make("kpop/coding-v0", backend=backend, limits=limits, sandbox_pool=pool)
            try:
                env.reset(options={"task_id": "coding/gen/0"})
                marks.append(env.run_python("import os; print(sorted(f for f in os.listdir('.') if f != 'scratch.py'));"
                                            f"open('episode-{i}', 'w').write('x')"))
                assert play(env, oracle_agent(env), "coding/gen/0").reward == 1.0
            finally:
                env.close()
        assert pool.starts == 1
        assert all("stdout:\n[]" in m for m in marks), marks


def test_tampering_with_the_supervisor_neither_passes_nor_breaks_grading(backend):
    """run_python code lowers the supervisor's limits (it shares its uid); the sandbox is then
    discarded, and grading happens in a fresh one: a right answer still passes, a wrong one fails."""
    tamper = "import resource; resource.prlimit(1, resource.RLIMIT_NOFILE, (8, 8)); print('lowered')"
    env = make("kpop/coding-v0", backend=backend, limits={"wall_time_s": 5.0, "cpu_time_s": 5.0})
    try:
        for right, reward in ((True, 1.0), (False, 0.0)):
            async def agent(messages, tools):
                if messages[-1]["role"] == "user":
                    return assistant(None, ("run_python", {"code": tamper}))
                return assistant(f"```python\n{env.coding_task.canonical if right else 'def nope(): pass'}```")

            ep = play(env, agent, "coding/gen/1")
            assert "lowered" in ep.messages[2]["content"], ep.messages[2]
            assert ep.status == "ok" and ep.reward == reward, (ep.error, ep.reward_detail)
    finally:
        env.close()


def _grade(backend, solution, test, entry="f"):
    """Run the grader alone in a sandbox: (passed, stdout, stderr)."""
    import json
    import secrets

    from environments.coding.env import GRADER_SOURCE
    from sandboxes import create_sandbox

    nonce = secrets.token_hex(8)
    with create_sandbox(backend) as sb:
        sb.write_file("solution.py", solution)
        spec = {"nonce": nonce, "prelude": "", "test": test, "entry_point": entry, "source": GRADER_SOURCE}
        r = sb.exec(["python3", "-I", "-c", GRADER_SOURCE, "grade"], stdin=json.dumps(spec))
    return r.exit_code == 0 and r.stdout == f"KPOP-VERDICT {nonce} pass\n", r.stdout, r.stderr


def test_grader_passes_plain_data_and_owns_its_stdout(backend):
    identity = "def f(x, scale=1):\n    print('solution noise')\n    return x\n"
    test = ("import math\n"
            "def check(c):\n"
            "    print('tests may print')\n"
            "    for v in [None, True, 3, -0.5, 'é', b'\\x00', 1 + 2j, [1, [2]], (1, (2,)), {1: 'a', (2, 3): [4]},\n"
            "              {1, 2}, frozenset({3}), float('inf'), 10 ** 40]:\n"
            "        out = c(v)\n"
            "        assert out == v and type(out) is type(v), (v, out)\n"
            "    assert math.isnan(c(float('nan'))) and c(5, scale=2) == 5\n")
    passed, out, err = _grade(backend, identity, test)
    assert passed, (out, err)
    assert "tests may print" in err and "solution noise" not in out + err


def test_grader_exceptions_cross_only_when_plain(backend):
    expects_value_error = ("def check(c):\n    try:\n        c(-1)\n    except ValueError:\n        return\n"
                           "    raise AssertionError('no ValueError')\n")
    raising = "def f(x):\n    raise ValueError('negative')\n"
    assert _grade(backend, raising, expects_value_error)[0]
    # StopIteration would end the tests' own loop early, as if every case had passed
    stop = "def f(x):\n    raise StopIteration\n"
    passed, _, err = _grade(backend, stop, "def check(c):\n    assert all(map(c, [0, 0, 0]))\n")
    assert not passed and "SolutionFailed: StopIteration" in err
