"""`kpop view`'s mismatch view, checked on a screenshot of headless Chromium.

A run directory is written with `TrajectoryArchive`: one trajectory whose tokens have known rollout
and learner logprobs, learner decisions and route flips, and a metrics.jsonl with the mismatch
metrics. The page is opened in Chromium and the screenshot's pixels are compared with what the
page promises: each token's background is the colour of its |delta logprob| bin, a masked token
carries the bar of its reason, a token whose route flipped carries the flip bar, and each plot's
points sit where their values put them, in their series' colours. The hover text is read from the
DOM after the page's JavaScript ran.
"""

from __future__ import annotations

import io
import json
import threading
import urllib.request
from collections import Counter

import pytest

from kpop.algo.losses import TokenDecision as D
from kpop.archive import TrajectoryArchive
from kpop.trajectory import Segment, Trajectory
from kpop.viewer.plots import SERIES_COLOURS
from kpop.viewer.server import RunsView, make_server
from viewer_browser import chromium

# per token: (loss mask, rollout logprob, learner logprob, decision, route-flip bitmask)
TOKENS = [
    (0, 0.0, 0.0, D.NOT_TRAINED, 0),  # 0-2: the prompt
    (0, 0.0, 0.0, D.NOT_TRAINED, 0),
    (0, 0.0, 0.0, D.NOT_TRAINED, 0),
    (1, -0.5, -0.5005, D.KEEP, 0),  # 3: agrees (|d| < 0.01): no colour
    (1, -0.5, -2.5, D.MASK_KL, 0),  # 4: |d| 2 -> darkest bin, masked by KPop
    (1, -1.0, -0.7, D.KEEP, 0b101),  # 5: |d| 0.3 -> orange; routes flipped in MoE layers 0 and 2
    (1, -0.2, -0.23, D.KEEP, 0),  # 6: |d| 0.03 -> pale yellow
    (1, -0.1, -0.2, D.MASK_RATIO, 0),  # 7: |d| 0.1 -> yellow, masked by IcePop's ratio window
    (1, -0.3, -1.0, D.MASK_STALE, 1 << 70),  # 8: |d| 0.7 -> red, stale; MoE layer 70 (> 64 layers)
    (1, -0.4, float("nan"), D.KEEP, 0),  # 9: a NaN learner logprob (hostile / buggy archive)
]
# the page's |delta logprob| bins (static/app.js DLOGP_BINS) and mask bars (MASK_MARKS)
WHITE, PALE, YELLOW, ORANGE, RED, DARK = "#ffffff", "#ffffb2", "#fecc5c", "#fd8d3c", "#f03b20", "#bd0026"
BACKGROUND = {3: WHITE, 4: DARK, 5: ORANGE, 6: PALE, 7: YELLOW, 8: RED, 9: DARK}
MARK = {4: "#1a4fd6", 7: "#8f2bd9", 8: "#0b8a7d"}
FLIP = "#222222"
STEPS = 5
METRICS = {  # step -> value; each rises, so its last point is the plot's top right corner
    "mask_rate": [0.01, 0.02, 0.03, 0.04, 0.05],
    "dlogp_mean": [0.1, 0.2, 0.3, 0.4, 0.5],
    "dlogp_max": [1.0, 2.0, 3.0, 4.0, 5.0],
    "route_flip_rate": [0.2, 0.3, 0.4, 0.5, 0.6],
    "route_flip_rate_lightning": [0.3, 0.35, 0.4, 0.45, 0.5],
    "route_flip_rate_mla": [0.1, 0.15, 0.2, 0.25, 0.3],
}


def write_run(run_dir) -> str:
    n = len(TOKENS)
    traj = Trajectory(run_id=run_dir.name, task_id="t0", env_id="kpop/tooluse-v0", seed=0,
                      messages=[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                      token_ids=[1000 + i for i in range(n)], logprobs=[t[1] for t in TOKENS],
                      loss_mask=[t[0] for t in TOKENS], segments=[Segment(3, n, 0)], reward=1.0)
    with TrajectoryArchive(run_dir) as archive:
        archive.write([traj], status="consumed", step=1, policy_version=1, train_logprobs=[[t[2] for t in TOKENS]],
                      decisions=[[int(t[3]) for t in TOKENS]], route_flips=[[t[4] for t in TOKENS]])
    with (run_dir / "metrics.jsonl").open("w") as f:
        for step in range(STEPS):
            f.write(json.dumps({"phase": "rl", "step": step, **{k: v[step] for k, v in METRICS.items()}}) + "\n")
    return traj.trajectory_id


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "mismatch"
    tid = write_run(run)
    server = make_server(run, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tid, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


class Screenshot:
    """The viewport as pixels, read at element rectangles (CSS px; the device scale factor is 1)."""

    def __init__(self, driver) -> None:
        from PIL import Image  # Pillow comes with tensorboard, a requirement

        self.image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        assert self.image.width == driver.execute_script("return window.innerWidth")  # 1 CSS px = 1 pixel

    def pixel(self, x: float, y: float) -> tuple[int, int, int]:
        return self.image.getpixel((int(x), int(y)))

    def dominant(self, x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int]:
        """The most common colour in [x0, x1) x [y0, y1): a token's background beneath its glyphs."""
        pixels = Counter(self.image.getpixel((x, y)) for x in range(int(x0), int(x1)) for y in range(int(y0), int(y1)))
        return pixels.most_common(1)[0][0]


def _rect(driver, css: str) -> dict[str, float]:
    return driver.execute_script("const r = document.querySelector(arguments[0]).getBoundingClientRect();"
                                 "return {left: r.left, top: r.top, right: r.right, bottom: r.bottom};", css)


def test_api_carries_decisions_flips_and_non_finite_numbers(served):
    tid, base = served
    with urllib.request.urlopen(f"{base}/api/runs/mismatch/trajectories/{tid}", timeout=30) as r:
        body = r.read().decode()

    def refuse(name: str) -> None:  # what a browser's JSON.parse does with NaN / Infinity literals
        raise ValueError(f"{name} is not JSON")

    t = json.loads(body, parse_constant=refuse)
    tokens = t["tokens"]
    assert t["decided_by"] == "the learner"
    assert {int(k): v["name"] for k, v in t["decisions"].items()} == {int(d): d.name for d in D}
    assert [x["decision"] for x in tokens] == [int(x[3]) for x in TOKENS]
    assert [x["route_flips"] for x in tokens] == [[], [], [], [], [], [0, 2], [], [], [70], []]
    assert tokens[4]["dlogp"] == 2.0 and tokens[0]["dlogp"] is None  # the prompt has no rollout logprob
    assert tokens[9]["train_logprob"] == "NaN" and tokens[9]["dlogp"] == "NaN"


def test_an_archive_without_decisions_gets_them_recomputed_with_the_runs_correction(tmp_path):
    run = tmp_path / "old"
    n = len(TOKENS) - 1  # without the NaN token
    traj = Trajectory(run_id="old", task_id="t0", env_id="kpop/tooluse-v0", token_ids=list(range(n)),
                      logprobs=[t[1] for t in TOKENS[:n]], loss_mask=[t[0] for t in TOKENS[:n]])
    with TrajectoryArchive(run) as archive:  # as the learner archived before it recorded decisions
        archive.write([traj], status="consumed", train_logprobs=[[t[2] for t in TOKENS[:n]]])
    # a key of another KPop version beside the window: the window must still be read
    (run / "config.yaml").write_text("algorithm:\n  correction: icepop\n  icepop_alpha: 0.8\n"
                                     "  icepop_beta: 1.2\n  knob_of_the_future: 3\n")
    t = RunsView(tmp_path).trajectory("old", traj.trajectory_id)
    assert t["decided_by"].startswith("the viewer (icepop, window [0.8, 1.2]")
    # ratio exp(train - rollout) outside [0.8, 1.2]: tokens 4 (|d| 2), 5 (0.3), 8 (0.7); 7 (0.1) is inside
    assert [x["decision"] for x in t["tokens"]] == [4, 4, 4, 0, 2, 2, 0, 0, 2]
    assert all(x["route_flips"] is None for x in t["tokens"])


def test_tokens_are_coloured_by_mismatch_and_masks_are_marked(served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    tid, base = served
    with chromium() as driver:
        driver.get(f"{base}/#/run/mismatch/t/{tid}")
        WebDriverWait(driver, 30).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#tokens .tok")))
        assert driver.find_element(By.ID, "token-mode").get_attribute("value") == "mismatch"
        driver.execute_script("document.getElementById('tokens').scrollIntoView()")
        shot = Screenshot(driver)
        for i, colour in BACKGROUND.items():
            r = _rect(driver, f"#tokens .tok[data-i='{i}']")
            assert r["right"] - r["left"] > 20 and r["bottom"] - r["top"] > 10, r  # laid out, on screen
            # between the bars (3 px under, 2 px over) and the rectangle's antialiased edges
            bg = shot.dominant(r["left"] + 2, r["top"] + 3, r["right"] - 2, r["bottom"] - 4)
            assert _close(bg, _rgb(colour)), (i, bg, colour)
            under = shot.dominant(r["left"] + 2, r["bottom"] - 2, r["right"] - 2, r["bottom"] - 1)
            assert _close(under, _rgb(MARK.get(i, colour))), (i, "bar under", under)
            over = shot.dominant(r["left"] + 2, r["top"] + 0.5, r["right"] - 2, r["top"] + 1.5)
            assert _close(over, _rgb(FLIP if TOKENS[i][4] else colour)), (i, "bar over", over)
        # the prompt: no mismatch colour, grey text
        r = _rect(driver, "#tokens .tok[data-i='0']")
        assert _close(shot.dominant(r["left"] + 2, r["top"] + 2, r["right"] - 2, r["bottom"] - 2), _rgb(WHITE))

        # the hover text, after the page's JavaScript wrote it
        def tip(i: int) -> str:
            return driver.find_element(By.CSS_SELECTOR, f"#tokens .tok[data-i='{i}']").get_attribute("title")

        assert tip(4).splitlines()[1:] == [
            "rollout logprob -0.5", "train logprob -2.5", "|Δ logprob| 2",
            f"decision MASK_KL: {D.MASK_KL.reason}", "route flips: none"]
        assert "route flips: MoE layers 0, 2" in tip(5) and f"decision KEEP: {D.KEEP.reason}" in tip(5)
        assert f"decision MASK_RATIO: {D.MASK_RATIO.reason}" in tip(7)
        assert f"decision MASK_STALE: {D.MASK_STALE.reason}" in tip(8) and "route flips: MoE layer 70" in tip(8)
        assert "train logprob NaN" in tip(9) and "|Δ logprob| NaN" in tip(9)
        assert "|Δ logprob| –" in tip(0) and "decision NOT_TRAINED" in tip(0)

        legend = driver.find_element(By.ID, "legend").text
        for words in ("|Δ logprob| = |train − rollout logprob| (nats):", "< 0.01", "0.2–0.5", "≥ 1",
                      "masked: MASK_KL", "masked: MASK_RATIO",
                      "masked: MASK_STALE", "MoE route flipped"):
            assert words in legend, words
        info = driver.find_element(By.ID, "info").text
        assert "3 of 7 trained tokens masked (MASK_KL 1, MASK_RATIO 1, MASK_STALE 1) — decided by the learner" in info
        assert "2 of 10 tokens flipped in ≥ 1 MoE layer" in info


def test_run_page_plots_mask_mismatch_and_route_flips(served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, base = served
    with chromium(height=1400) as driver:
        driver.get(f"{base}/#/run/mismatch")
        panels = ["mask_rate", "dlogp_mean", "dlogp_max", "route_flip_rate"]
        WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#plots svg")) == len(panels))
        assert [e.get_attribute("data-metric") for e in driver.find_elements(By.CSS_SELECTOR, "#plots > div")] == panels
        driver.execute_script("document.getElementById('plots').scrollIntoView()")
        shot = Screenshot(driver)
        # plots.py geometry: 360 x 200, plot area from x 48 to 350; y from 24 (38 under a legend) to 172
        to_screen = ("const svg = document.querySelector(arguments[0]), p = svg.createSVGPoint();"
                     "p.x = arguments[1]; p.y = arguments[2]; const q = p.matrixTransform(svg.getScreenCTM());"
                     "return [q.x, q.y];")  # SVG user units -> viewport CSS px (the plot's border included)
        for panel in panels:
            css = f"#plots div[data-metric='{panel}'] svg"
            keys = [k for k in METRICS if k.startswith(panel)] if panel == "route_flip_rate" else [panel]
            top = 38 if len(keys) > 1 else 24
            y_max = max(METRICS[k][-1] for k in keys)
            y_min = min(v for k in keys for v in METRICS[k])
            for key, colour in zip(keys, SERIES_COLOURS):
                for step in (0, STEPS - 1):  # the first and last points, where their values put them
                    x = 48 + 302 * step / (STEPS - 1)
                    y = top + (172 - top) * (1 - (METRICS[key][step] - y_min) / (y_max - y_min))
                    got = shot.pixel(*driver.execute_script(to_screen, css, x, y))
                    assert _close(got, _rgb(colour), tol=10), (panel, key, step, got, colour)
        legend = driver.find_element(By.CSS_SELECTOR, "#plots div[data-metric='route_flip_rate'] svg").text
        assert all(name in legend for name in ("all", "Lightning", "MLA"))
