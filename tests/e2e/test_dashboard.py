"""The gateway's dashboard in a real headless browser (Debian's chromium, driven by Playwright) in front
of real llama-server processes on the Gemma 3 270M GGUF, started by `orchestrate up`: the page asks
for the key, shows each server and its state, follows an on-demand start made by an API client without
a reload, starts a server from its button and shows that start's failure with its cause, opens a
server's plan, log and saved bench run with its plot; fits a phone's width; every request the page
makes goes to the gateway, and no answer holds a key. Screenshots are kept (tmp dir, and
$ORCHESTRATOR_ARTIFACTS or tests/artifacts/)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.gateway_util import gateway_profile, up

pytestmark = pytest.mark.engines
ROOT = Path(__file__).resolve().parents[2]
GW_KEY, UP_KEY = "sk-dash-Gw81xVt9aaPP", "sk-dash-Up27pWz4bbQQ"


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed: scripts/setup.sh installs it with the test extras "
                    "(apt-get install chromium)")
    pytest.skip("chromium is not installed: apt-get install chromium (scripts/setup.sh does it as root)")


def keep(shot: Path) -> Path:
    folder = Path(os.environ.get("ORCHESTRATOR_ARTIFACTS") or ROOT / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(shot, folder / shot.name))


def test_dashboard_in_a_real_browser(env, gemma: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    from orchestrator.provision import builds as provision

    browser_path = chromium()
    provision.build("llama.cpp", "cpu")                 # cached after the first build
    model = str(gemma)
    profile, port = gateway_profile(env, "dash", [
        {"name": "chat", "model": {"path": model, "served_name": "gemma-chat"}},
        {"name": "lazy", "model": {"path": model, "served_name": "gemma-lazy"}, "start": "on_demand",
         "api_key_env": "UP_KEY"},
        # An option the build knows with a value it refuses: past every check before the start, refused by
        # the engine itself (the failure the page must show with its cause).
        {"name": "broken", "model": {"path": model, "served_name": "gemma-broken"}, "start": "on_demand",
         "extra_args": ["-fa", "sometimes"]},
    ], api_key_env="GW_KEY")
    keys = {"GW_KEY": GW_KEY, "UP_KEY": UP_KEY}
    up(env, profile, keys)
    base = f"http://127.0.0.1:{port}"
    requests: list[str] = []
    bodies: list[str] = []
    shot = env.tmp / "dashboard.png"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, headless=True,
                                         args=["--no-first-run", "--disable-background-networking",
                                               "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda r: requests.append(r.url))

            def on_response(r: Any) -> None:
                if r.url.startswith(base):
                    try:
                        bodies.append(r.text())
                    except Exception:  # a body the browser did not keep (a redirect, an aborted fetch)
                        pass

            page.on("response", on_response)
            first = page.goto(base + "/")
            assert first is not None and first.status == 401          # the shell without the key: no data
            expect(page.locator("#login")).to_be_visible()
            assert "gemma" not in page.content()
            page.fill("#key", "sk-wrong-0000000000")
            page.click("#login button")
            expect(page.locator("#login-error")).to_have_text("that key was refused")
            page.fill("#key", GW_KEY)
            page.click("#login button")
            card = {n: page.locator(f'.card[data-server="{n}"]') for n in ("chat", "lazy", "broken")}
            expect(card["chat"]).to_have_attribute("data-state", "running")
            expect(card["lazy"]).to_have_attribute("data-state", "stopped")
            expect(card["broken"]).to_have_attribute("data-state", "stopped")
            expect(card["chat"]).to_contain_text("llama.cpp b")
            expect(card["chat"]).to_contain_text(gemma.name)
            expect(card["chat"].locator("dd", has_text="pid ")).to_have_count(1)
            expect(page.locator('[data-resource="RAM"]')).to_contain_text("measured")

            # An API client asks for the on-demand server: the page follows, without a reload.
            c = openai.OpenAI(base_url=base + "/v1", api_key=GW_KEY, max_retries=0, timeout=180)
            answer = c.completions.create(model="gemma-lazy", prompt="The capital of France is", max_tokens=8)
            assert answer.choices[0].text
            expect(card["lazy"]).to_have_attribute("data-state", "running", timeout=15_000)
            expect(card["lazy"]).to_contain_text("1 req")

            # The broken server, started from its button: its failure and cause are on its card.
            card["broken"].locator('button[data-action="start"]').click()
            expect(card["broken"]).to_have_attribute("data-state", "failed", timeout=120_000)
            expect(card["broken"].locator(".failure")).to_contain_text("bad_flag")
            expect(page.locator("#events")).to_contain_text("broken: start failed")
            page.screenshot(path=str(shot), full_page=True)

            # A saved bench run of the running server: its table and plot in the server's detail.
            bench = env.run("bench", str(profile), "--server", "chat", "--prompt-tokens", "16", "--gen-tokens", "4",
                            "--concurrency", "1,2", "--runs", "1", "--no-prefix", "--save", env=keys)
            assert bench.returncode == 0, bench.stdout + bench.stderr

            # A server's plan (every flag with its reason), its last log lines and its saved bench run.
            card["chat"].click()
            expect(page.locator("#detail")).to_be_visible()
            expect(page.locator("#detail-body table").first).to_contain_text("--port")
            expect(page.locator("#detail-body pre.log")).to_contain_text("listening on", timeout=10_000)
            expect(page.locator("#detail-body table.bench tbody tr")).to_have_count(2)
            plot = page.locator("#detail-body img.plot")
            expect(plot).to_have_attribute("src", re.compile(r"^blob:"))
            page.wait_for_function("document.querySelector('#detail-body img.plot').naturalWidth > 0")
            page.screenshot(path=str(env.tmp / "dashboard-server.png"))
            plot.screenshot(path=str(env.tmp / "dashboard-bench-plot.png"))
            phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            phone.on("request", lambda r: requests.append(r.url))
            phone.goto(base + "/")
            phone.fill("#key", GW_KEY)
            phone.click("#login button")
            expect(phone.locator('.card[data-server="lazy"]')).to_have_attribute("data-state", "running")
            width = phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the page is {width} px wide on a 390 px phone"
            browser.close()
    finally:
        env.run("down", str(profile))
    kept = keep(shot)
    keep(env.tmp / "dashboard-server.png")
    keep(env.tmp / "dashboard-bench-plot.png")
    assert kept.stat().st_size > 10_000
    # Every request went to the gateway (a blob: URL is the plot the page fetched, shown from memory).
    elsewhere = [u for u in requests if not u.startswith((base + "/", f"blob:{base}/"))]
    assert requests and not elsewhere, elsewhere
    assert any("/ui/api/state" in u for u in requests)
    assert bodies and not any(GW_KEY in b or UP_KEY in b for b in bodies)
