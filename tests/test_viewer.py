"""`kpop view`: the JSON API, and the page end to end in headless Chromium (selenium)."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request

import pytest

from kpop.archive import TrajectoryArchive
from kpop.viewer.plots import SERIES_COLOURS, line_plot, series_plot
from kpop.viewer.server import make_server
from demo_run import write_demo_run
from viewer_browser import chromium



@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run = write_demo_run(root / "demo", seeds=(0,))
    (root / "other" / "trajectories").mkdir(parents=True)  # an empty sibling run
    (root / "not-a-run").mkdir()
    server = make_server(run, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield run, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_api(served):
    run, base = served
    status, doc = get(base + "/api/runs")
    assert status == 200 and doc["default"] == "demo"
    assert [r["name"] for r in doc["runs"]] == ["demo", "other"]
    assert doc["runs"][0]["trajectories"] == 4 and doc["runs"][0]["steps"] == 6

    status, rows = get(base + "/api/runs/demo/trajectories?env_id=kpop/workflow-v0&min_reward=1")
    assert status == 200 and len(rows) == 1 and rows[0]["reward"] == 1.0
    _, rows = get(base + "/api/runs/demo/trajectories?max_version=0")
    assert [r["min_version"] for r in rows] == [0]

    tid = rows[0]["trajectory_id"]
    status, t = get(f"{base}/api/runs/demo/trajectories/{tid}")
    assert status == 200 and t["messages"][0]["role"] == "user"
    rec = TrajectoryArchive(run).records(ids=[tid])[0]
    assert [x["id"] for x in t["tokens"]] == rec.trajectory.token_ids
    text = "".join(x["text"] for x in t["tokens"])  # the prompt as the rollout renders it: tools, then the task
    assert text.startswith("<|im_start|>system\n# Tools") and t["messages"][0]["content"] in text
    model = [x for x in t["tokens"] if x["mask"]]
    # the demo archive has no learner decisions: the viewer recomputes them (KPop, phi 0.5)
    assert t["decided_by"].startswith("the viewer (kpop, kpop_phi 0.5")
    assert t["decisions"]["1"]["name"] == "MASK_KL"
    assert model and all(x["decision"] in (0, 1) and x["version"] is not None for x in model)
    assert all(x["decision"] == 4 and x["dlogp"] is None for x in t["tokens"] if not x["mask"])
    assert any(x["decision"] == 1 for x in model)  # the demo's large mismatches are masked
    assert all(x["dlogp"] == pytest.approx(abs(x["train_logprob"] - x["logprob"])) for x in model)
    assert all(x["route_flips"] is None for x in t["tokens"])  # not recorded

    status, plots = get(base + "/api/runs/demo/plots")
    assert status == 200 and [p["metric"] for p in plots] == ["reward_mean", "staleness_mean", "mask_rate",
                                                              "eval_reward"]
    assert plots[0]["svg"].startswith("<svg") and plots[0]["svg"].count("<circle") == 6

    assert get(base + "/api/runs/demo/trajectories?min_reward=high") == (400, {"error": "filter min_reward='high' is not a number"})
    assert get(base + "/api/runs/demo/trajectories?colour=red")[0] == 400
    assert get(base + "/api/runs/not-a-run/trajectories")[0] == 404
    assert get(base + "/api/runs/..%2F..%2Fetc/trajectories")[0] == 404
    assert get(base + "/api/runs/demo/trajectories/nope")[0] == 404
    assert get(base + "/static/..%2Fserver.py")[0] == 404


def _raw_get(base: str, path: str, host: str | None = None) -> int:
    """GET with an explicit Host header (urllib always sends the URL's)."""
    port = int(base.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("GET", path, skip_host=host is not None)
    if host is not None:
        conn.putheader("Host", host)
    conn.endheaders()
    status = conn.getresponse().status
    conn.close()
    return status


def test_run_names_never_leave_the_runs_directory(tmp_path):
    # the runs directory's parent looks like a run itself: '..' must still not reach it
    parent = tmp_path / "project"
    (parent / "trajectories").mkdir(parents=True)
    (parent / "metrics.jsonl").write_text('{"phase": "rl", "step": 0, "reward_mean": 0.5}\n')
    run = write_demo_run(parent / "runs" / "demo", seeds=(0,), env_ids=("kpop/tooluse-v0",))
    server = make_server(run, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert get(base + "/api/runs/demo/plots")[0] == 200
        for name in ("..", "%2E%2E", ".", "%2E"):
            assert _raw_get(base, f"/api/runs/{name}/plots") == 404, name
            assert _raw_get(base, f"/api/runs/{name}/trajectories") == 404, name
    finally:
        server.shutdown()
        server.server_close()


def test_only_loopback_host_headers_are_answered(served):
    _, base = served
    port = base.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert _raw_get(base, "/api/runs", host) == 200, host
    # DNS rebinding: the attacker's name resolves to 127.0.0.1, the browser sends that name
    for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1:{int(port) + 1}", "", "127.0.0.1"):
        assert _raw_get(base, "/api/runs", host) == 403, host
        assert _raw_get(base, "/", host) == 403, host


def test_loopback_only_and_run_dir_checked(tmp_path):
    with pytest.raises(ValueError, match="loopback only"):
        make_server(tmp_path, host="0.0.0.0")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        make_server(tmp_path, port=0)


def test_line_plot_escapes_and_scales():
    svg = line_plot([(2, 1.0), (0, 0.0), (1, 0.5)], title="<b>r</b>")
    assert "&lt;b&gt;r&lt;/b&gt;" in svg and "<b>" not in svg
    assert svg.count("<circle") == 3
    with pytest.raises(ValueError):
        line_plot([], title="x")


def test_series_plot_shares_axes_and_names_its_series():
    svg = series_plot({"all": [(0, 0.2), (1, 0.6)], "<i>MLA</i>": [(0, 0.1), (1, 0.3)], "none": []}, title="flips")
    assert svg.count('class="series"') == 2 and 'data-series="none"' not in svg  # an empty series is left out
    assert f'stroke="{SERIES_COLOURS[0]}"' in svg and f'stroke="{SERIES_COLOURS[1]}"' in svg
    assert ">all</text>" in svg and "&lt;i&gt;MLA&lt;/i&gt;" in svg and "<i>" not in svg  # the legend, escaped
    assert ">all</text>" not in line_plot([(0, 1.0)], title="x")  # one series: no legend
    with pytest.raises(ValueError, match="at least one point"):
        series_plot({"a": [], "b": []}, title="x")
    with pytest.raises(ValueError, match="at most 4 series"):
        series_plot({str(i): [(0, i)] for i in range(5)}, title="x")


def test_page_in_headless_chromium(served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    run, base = served
    with chromium() as driver:
        wait = WebDriverWait(driver, 30)
        driver.get(base + "/")
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "a.traj-link")))
        assert "#/run/demo" in driver.current_url
        assert [a.get_attribute("data-run") for a in driver.find_elements(By.CSS_SELECTOR, "#run-list a")] == ["demo", "other"]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#trajectories tbody tr")) == 4
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#plots svg")) == 4)

        # filter: the workflow episodes only
        driver.find_element(By.NAME, "env_id").send_keys("kpop/workflow-v0")
        driver.find_element(By.ID, "apply").click()
        count = "return (document.getElementById('count') || {}).textContent"  # the table is re-rendered
        wait.until(lambda d: d.execute_script(count) == "2 trajectories")
        rows = driver.find_elements(By.CSS_SELECTOR, "#trajectories tbody tr")
        assert {r.find_elements(By.TAG_NAME, "td")[1].text for r in rows} == {"kpop/workflow-v0"}

        # into the oracle's episode (reward 1)
        oracle = TrajectoryArchive(run).load(env_id="kpop/workflow-v0", min_reward=1.0)[0]
        driver.find_element(By.CSS_SELECTOR, f"tr[data-id='{oracle.trajectory_id}'] a.traj-link").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#tokens .tok")))
        assert driver.find_element(By.ID, "reward").text == "1"
        assert '"state_matches": true' in driver.find_element(By.ID, "reward-detail").text
        msgs = driver.find_elements(By.CSS_SELECTOR, "#messages .msg")
        assert len(msgs) == len(oracle.messages)
        assert "Resolve support ticket" in driver.find_element(By.CSS_SELECTOR, "#messages .msg.user").text
        calls = driver.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant .tool-call")
        assert calls and calls[0].text.startswith("→ get_ticket(")
        first_tool = driver.find_element(By.CSS_SELECTOR, "#messages .msg.tool")
        assert first_tool.text.count(oracle.messages[3]["content"][:20]) == 1

        # tokens coloured by loss mask ...
        tokens = driver.find_elements(By.CSS_SELECTOR, "#tokens .tok")
        assert len(tokens) == oracle.num_tokens
        assert driver.find_element(By.ID, "token-mode").get_attribute("value") == "mismatch"  # has train logprobs
        Select(driver.find_element(By.ID, "token-mode")).select_by_value("loss")
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#tokens.loss")))
        bg = lambda css: driver.execute_script(  # noqa: E731
            "return getComputedStyle(document.querySelector(arguments[0])).backgroundColor", css)
        assert bg("#tokens .tok.m1") == "rgb(201, 239, 213)"
        assert bg("#tokens .tok.m0") == "rgba(0, 0, 0, 0)"
        # ... and by the KPop mask
        Select(driver.find_element(By.ID, "token-mode")).select_by_value("kpop")
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#tokens.kpop")))
        assert driver.find_elements(By.CSS_SELECTOR, "#tokens .tok.drop")
        assert bg("#tokens .tok.drop") == "rgb(246, 185, 182)" and bg("#tokens .tok.keep") == "rgb(207, 224, 251)"
        assert "masked by KPop" in driver.find_element(By.ID, "legend").text
        tip = driver.find_element(By.CSS_SELECTOR, "#tokens .tok.drop").get_attribute("title")
        assert "rollout logprob" in tip and "policy version" in tip and "decision MASK_KL: masked by KPop" in tip

        driver.find_element(By.ID, "back").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "a.traj-link")))
