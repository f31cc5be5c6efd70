"""`sfumato abtest` over real HTTP (uvicorn) with two real exports, and in a real browser
(Debian's chromium driven by selenium): blind sides, balanced and recorded; same noise for both
models; token auth; votes on disk, in the parquet table and on the results page."""

from __future__ import annotations

import io
import json
import os
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image

from helpers import exported
from sfumato.abtest.app import ABTest, build_app, conditions_for, load_arm
from sfumato.testing.served import Served

TOKEN = "abtest-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def arms(straight, flow_run):
    return [load_arm(f"ddpm-model={exported(straight)}"), load_arm(f"flow-model={exported(flow_run)}")]


@pytest.fixture()
def served(arms, tmp_path):
    test = ABTest(tmp_path / "ab", arms, conditions_for(arms, None), planned=30, steps=4, seed=5)
    server = Served(build_app(test, TOKEN))
    yield test, server.url
    server.stop()


def _trial(url):
    answer = requests.post(f"{url}/api/trial", headers=AUTH, timeout=60)
    assert answer.status_code == 200
    return answer.json()


def test_the_page_and_its_urls_never_say_which_model_drew_which(served, arms):
    test, url = served
    secrets_ = [arm.id for arm in arms] + [arm.source for arm in arms] + ["ddpm", "flow"]
    page = requests.get(url, headers=AUTH, timeout=30).text
    trial = _trial(url)
    shown = json.dumps(trial) + page
    assert not [s for s in secrets_ if s in shown]
    assert re.fullmatch(r"/api/image/[0-9a-f]{32}/left", trial["left"])
    image = requests.get(url + trial["left"], headers=AUTH, timeout=30)
    assert image.headers["content-type"] == "image/png" and not [s for s in secrets_ if s in str(image.headers)]


def test_sides_are_balanced_and_recorded_and_both_models_get_the_same_noise(served, arms):
    test, url = served
    for _ in range(20):
        trial = _trial(url)
        assert requests.post(
            f"{url}/api/vote", json={"trial": trial["trial"], "choice": "left", "rater": "r"}, headers=AUTH, timeout=30
        ).json()["recorded"]
    votes, damaged = test.log.read()
    assert len(votes) == 20 and damaged == 0
    found = requests.get(f"{url}/api/results", headers=AUTH, timeout=30).json()
    assert found["left_shown"] == {"ddpm-model": 10, "flow-model": 10}  # balanced blocks of two
    assert found["overall"]["models"]["ddpm-model"]["wins"] == 10  # "left" won: whoever was there
    assert all(v["seed_left"] == v["seed_right"] for v in votes)  # same noise, two models
    assert all((test.images_dir / f"{v['left_image']}.png").is_file() for v in votes)
    table = pq.read_table(io.BytesIO(requests.get(f"{url}/api/votes.parquet", headers=AUTH, timeout=30).content))
    assert table.num_rows == 20 and set(table.column("choice").to_pylist()) == {"left"}


def test_a_collection_round_on_one_model_draws_the_sides_from_different_noise(arms, tmp_path):
    test = ABTest(tmp_path / "collect", [arms[0], arms[0]], conditions_for(arms[:1], None), steps=4, seed=1)
    trial = test.new_trial()
    assert trial.seed_left != trial.seed_right and trial.hashes["left"] != trial.hashes["right"]
    same = ABTest(tmp_path / "same", arms, conditions_for(arms, None), steps=4, seed=1).new_trial()
    assert same.seed_left == same.seed_right


def test_the_page_draws_with_its_guidance_interval_and_refuses_a_bad_one(arms, tmp_path):
    """Four steps sit at noise levels 0.999 .. 0.249 (DDPM) and above 0 (flow): an interval of
    [0, 0] holds none of them, so both sides are the unguided images of the same trial."""
    conditions = conditions_for(arms, None)

    def trial(name, **guidance):
        return ABTest(tmp_path / name, arms, conditions, steps=4, seed=1, **guidance).new_trial().hashes

    guided = trial("guided", guidance_scale=3.0)
    assert trial("none", guidance_scale=3.0, guidance_interval=(0.0, 0.0)) == trial("unguided", guidance_scale=1.0)
    limited = trial("limited", guidance_scale=3.0, guidance_interval=(0.3, 0.8))
    assert guided["left"] != limited["left"] and guided["right"] != limited["right"]
    with pytest.raises(ValueError, match=r"guidance_interval must be \[lo, hi\] with 0 <= lo <= hi <= 1"):
        ABTest(tmp_path / "bad", arms, conditions, guidance_interval=(0.8, 0.2))


def test_tokens_bad_votes_and_spent_trials_get_clear_answers(served):
    test, url = served
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    assert requests.post(f"{url}/api/trial", timeout=30).status_code == 401
    assert requests.post(f"{url}/api/trial", headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 403
    trial = _trial(url)
    bad = requests.post(
        f"{url}/api/vote", json={"trial": trial["trial"], "choice": "both", "rater": "r"}, headers=AUTH, timeout=30
    )
    assert bad.status_code == 422 and "choice" in bad.text
    vote = {"trial": trial["trial"], "choice": "tie", "rater": "r"}
    assert requests.post(f"{url}/api/vote", json=vote, headers=AUTH, timeout=30).status_code == 200
    assert requests.post(f"{url}/api/vote", json=vote, headers=AUTH, timeout=30).status_code == 409  # one vote a trial
    assert requests.get(url + trial["left"], headers=AUTH, timeout=30).status_code == 404
    assert len(test.log.read()[0]) == 1


def _chrome():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are not installed: .ci/run installs them with apt-get")
        pytest.skip("no chromium / chromedriver here (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_a_person_votes_in_a_real_browser_and_the_table_and_results_page_show_it(served, arms, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    test, url = served
    browser = _chrome()
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(f"{url}/login?token={TOKEN}")  # sets the cookie, then the page
        wait.until(lambda b: b.find_element(By.ID, "vote-left").is_enabled())
        assert not [arm.id for arm in arms if arm.id in browser.page_source]
        browser.find_element(By.ID, "rater").send_keys("browser-rater")
        for choice in ("left", "tie", "right", "skip"):
            wait.until(lambda b, choice=choice: b.find_element(By.ID, f"vote-{choice}").is_enabled())
            before = browser.find_element(By.ID, "left").get_attribute("src")
            browser.find_element(By.ID, f"vote-{choice}").click()
            wait.until(
                lambda b, before=before: (
                    b.find_element(By.ID, "left").get_attribute("src") != before
                    and b.find_element(By.ID, "vote-left").is_enabled()
                )
            )
        assert browser.find_element(By.ID, "count").text == "3"
        image = browser.find_element(By.ID, "left").screenshot_as_png
        assert Image.open(io.BytesIO(image)).size[0] > 100  # the image shows, scaled up
        browser.get(f"{url}/results")
        summary = browser.find_element(By.ID, "summary").text
        assert summary.startswith("3 votes counted (1 skipped, 1 ties)") and "27 remaining" in summary
        rows = browser.find_elements(By.CSS_SELECTOR, "#overall tr")
        assert len(rows) == 3 and any("ddpm-model" in r.text for r in rows)
    finally:
        browser.quit()
    votes, _ = test.log.read()
    assert [(v["rater"], v["choice"]) for v in votes] == [
        ("browser-rater", c) for c in ("left", "tie", "right", "skip")
    ]
    table = pq.read_table(io.BytesIO(requests.get(f"{url}/api/votes.parquet", headers=AUTH, timeout=30).content))
    assert table.column("choice").to_pylist() == ["left", "tie", "right", "skip"]
    decided = [v for v in votes if v["choice"] in ("left", "right")]
    left = np.asarray(Image.open(test.images_dir / f"{decided[0]['left_image']}.png"))
    assert left.shape == (32, 32, 3)


def test_a_text_ab_test_shows_and_records_the_prompt_each_pair_was_drawn_for(text_run, tmp_path):
    """A collection round on the text run: the page's trial names its prompt, the vote records it,
    each kept image is the model's image of that prompt and seed, the results page lists the
    prompt (escaped), and a prompt the model would cut off is refused before any trial."""
    from sfumato.data.pairs import run_pairs
    from sfumato.serve.backends import Job

    arm = load_arm(f"text={exported(text_run)}")
    prompts = ["a photo of a frog", "a ship & <frog>"]
    conditions = tmp_path / "prompts.txt"
    conditions.write_text(f"{prompts[0]}\n\n  {prompts[1]}\n")
    # Two steps without guidance: the text UNet's attention at 32 px costs ~0.1 s a step here.
    test = ABTest(
        tmp_path / "ab", [arm, arm], conditions_for([arm, arm], conditions), steps=2, guidance_scale=1.0, seed=2
    )
    assert test.conditions == prompts
    server = Served(build_app(test, TOKEN))
    try:
        shown = []
        while set(shown) != set(prompts) and len(shown) < 12:  # until each prompt has had a trial
            trial = _trial(server.url)
            shown.append(trial["condition"])
            vote = {"trial": trial["trial"], "choice": "left", "rater": "r"}
            assert requests.post(f"{server.url}/api/vote", json=vote, headers=AUTH, timeout=30).status_code == 200
        page = requests.get(f"{server.url}/results", headers=AUTH, timeout=30).text
    finally:
        server.stop()
    assert set(shown) == set(prompts), f"trials draw from the file's prompts: {shown}"
    votes, _ = test.log.read()
    assert [v["condition"] for v in votes] == shown
    assert "a ship &amp; &lt;frog&gt;" in page and "<frog>" not in page

    def draw(prompt: str, seed: int) -> bytes:
        job = Job("j", seed, 2, 1.0, 1, "dpm-solver++", 32, 32, prompt=prompt)
        image = arm.backend.generate([job])[0][0]
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        return buffer.getvalue()

    vote = votes[0]
    kept = (test.images_dir / f"{vote['left_image']}.png").read_bytes()
    assert kept == draw(vote["condition"], vote["seed_left"]), "the left image is the model's for that prompt and seed"
    other = next(p for p in prompts if p != vote["condition"])
    assert kept != draw(other, vote["seed_left"])
    # The preference pairs carry the prompts (sfumato.data.pairs: what an alignment trains on).
    run_pairs([tmp_path / "ab"], tmp_path / "pairs.parquet")
    rows = pq.read_table(tmp_path / "pairs.parquet").to_pylist()
    assert [r["condition"] for r in rows] == shown and rows[0]["chosen"] == kept

    too_long = tmp_path / "too-long.txt"
    too_long.write_text("a photo of a frog\n" + "a photo of a frog " * 3 + "\n")
    with pytest.raises(ValueError, match=r"too-long.txt line 2: the prompt is \d+ tokens long .* at most 12"):
        conditions_for([arm, arm], too_long)
