"""The status page ``/ui/`` in a real headless Chromium, against a real edgeproxy and pebble.

The fleet (``testkit.fleet``) holds an active name, one whose upstream is down, one the
CA refuses (failing, with a hint), one denied and a removed one. The browser loads the page, filters by
state, searches by name (also with the keyboard alone), opens the failing name's page (hint,
attempt history) and runs the doctor; every page is screenshotted into the test's folder, and the DevTools log must show no
request to any origin but the admin listener's. With a token configured the page shows only a
sign-in form until the token is given; the session cookie and the forms' cross-site checks are
tested over plain HTTP too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from edgeproxy.admin.ui import CSP
from testkit.browser import Browser, chromium, needs_chromium
from testkit.fleet import ACTIVE, BROKEN, DENIED, FAILING, REMOVED, start_fleet
from testkit.pebble import Pebble
from testkit.proxy import base_config, running_proxy
from testkit.upstreams import http_handler, start_upstream

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-admin-token-for-the-page"
METRICS_TOKEN = "read-only-metrics-token"


def _by_css(driver: Any, css: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, css))


async def _rows(b: Browser) -> list[tuple[str, str]]:
    """(hostname, state) of every row of the hostnames table."""

    def read() -> list[tuple[str, str]]:
        rows = _by_css(b.driver, "#hostnames tbody tr")
        out = []
        for row in rows:
            heads = _by_css(row, "th[scope=row]")
            if heads:
                out.append((heads[0].text, _by_css(row, ".badge")[0].text))
        return out

    return await b.run(read)


async def _submit_filters(b: Browser, state: str, query: str) -> None:
    def act() -> None:  # a real user's steps: pick, type, press the button
        from selenium.webdriver.support.ui import Select

        Select(_by_css(b.driver, "select#state")[0]).select_by_value(state)
        box = _by_css(b.driver, "input#q")[0]
        box.clear()
        box.send_keys(query)
        _by_css(b.driver, "form.filters button[type=submit]")[0].click()

    await b.navigate(act)


async def _text(b: Browser, css: str) -> str:
    return await b.run(lambda: " ".join(e.text for e in _by_css(b.driver, css)))


@needs_chromium
async def test_status_page_shows_the_fleet_filters_searches_and_explains(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],
    roots_file: Callable[[Pebble], Path],
) -> None:
    shots = tmp_path / "screenshots"
    async with start_fleet(tmp_path, nursery, make_pebble, roots_file) as fleet:
        origin = fleet.admin_url
        with chromium(shots) as b:
            await b.get(f"{origin}/ui/")
            rows = dict(await _rows(b))
            assert rows == {
                ACTIVE: "active",
                BROKEN: "active",
                FAILING: "failing",
                REMOVED: "removed",
                DENIED: "denied",
            }
            assert await _text(b, "#count-active") == "2"
            assert await _text(b, "#count-failing") == "1"
            assert await _text(b, "#count-denied") == "1"
            assert "the CA will not issue for this name" in await _text(b, "#hostnames")
            # The label/control pairs and the table's headers are real markup.
            assert await b.run(lambda: len(_by_css(b.driver, "label[for=state], label[for=q]")))
            assert await _text(b, "#hostnames thead") == (
                "Hostname State Expires Renewal Issuer Last error"
            )
            index_png = await b.screenshot("index")

            await _submit_filters(b, "failing", "")
            assert await _rows(b) == [(FAILING, "failing")]
            await b.screenshot("filter-failing")
            await _submit_filters(b, "active", "")
            assert {n for n, _ in await _rows(b)} == {ACTIVE, BROKEN}
            await _submit_filters(b, "denied", "")
            assert await _rows(b) == [(DENIED, "denied")]
            assert "the allow-check refused this name" in await _text(b, "#hostnames")
            await _submit_filters(b, "", "sh")
            assert await _rows(b) == [(ACTIVE, "active")]
            await _submit_filters(b, "", "b")
            assert await _rows(b) == [(BROKEN, "active")]
            await b.screenshot("search")
            await _submit_filters(b, "removed", "sh")
            assert await _rows(b) == []

            await _keyboard_only(b, origin)

            await b.get(f"{origin}/ui/?q=refused")
            await b.navigate(lambda: _by_css(b.driver, f"a[href='/ui/hostnames/{FAILING}']")[0].click())
            hint = await _text(b, "#hint")
            assert "the CA will not issue for this name" in hint
            history = await _text(b, "#history tbody")
            assert "issue failed urn:ietf:params:acme:error:rejectedIdentifier" in history
            assert "<em>policy</em>" in await _text(b, ".problem")  # the CA's text, escaped
            assert await b.run(lambda: _by_css(b.driver, ".problem em")) == []
            await b.screenshot("hostname-failing")

            def doctor() -> None:
                _by_css(b.driver, "form[action$='/doctor'] button")[0].click()

            await b.navigate(doctor)
            verdict = await _text(b, "#verdict")
            assert verdict.startswith("Verdict: ")
            assert await _text(b, "#diagnosis li")  # each finding is listed
            await b.screenshot("hostname-doctor")

            await b.get(f"{origin}/ui/hostnames/{ACTIVE}")
            assert "issue issued" in await _text(b, "#history tbody")
            assert await _text(b, ".problem") == ""
            await b.screenshot("hostname-active")

            requested = await b.requested_urls()
    assert requested, "the DevTools log saw no request at all"
    own = urlsplit(origin).netloc
    foreign = [u for u in requested if urlsplit(u).netloc != own]
    assert foreign == []
    for name in ("index", "filter-failing", "search", "hostname-failing", "hostname-doctor"):
        assert (shots / f"{name}.png").stat().st_size > 1000
    _keep_readme_screenshot(index_png)


async def _keyboard_only(b: Browser, origin: str) -> None:
    """Search and open a hostname with the keyboard alone: Tab to the search box, type,
    Enter; Tab to the row's link, Enter."""
    from selenium.webdriver.common.keys import Keys

    await b.get(f"{origin}/ui/")

    def tab_to(matches: Callable[[Any], bool]) -> Any:
        body = _by_css(b.driver, "body")[0]
        body.send_keys(Keys.TAB)
        for _ in range(40):
            active = b.driver.switch_to.active_element
            if matches(active):
                return active
            active.send_keys(Keys.TAB)
        raise AssertionError("Tab never reached the element")

    def search() -> None:
        box = tab_to(lambda e: e.get_attribute("id") == "q")
        box.send_keys("sh", Keys.ENTER)

    await b.navigate(search)
    assert await _rows(b) == [(ACTIVE, "active")]

    def open_row() -> None:
        link = tab_to(lambda e: e.get_attribute("href") == f"{origin}/ui/hostnames/{ACTIVE}")
        link.send_keys(Keys.ENTER)

    await b.navigate(open_row)
    assert await b.run(lambda: b.driver.current_url) == f"{origin}/ui/hostnames/{ACTIVE}"


def _keep_readme_screenshot(png: Path) -> None:
    """``EDGEPROXY_UPDATE_SCREENSHOT=1`` writes the index screenshot to docs/status-page.png,
    cropped to the page's content and reduced to 32 colours to stay small in the repository."""
    import os

    if os.environ.get("EDGEPROXY_UPDATE_SCREENSHOT") != "1":
        return
    from PIL import Image, ImageChops

    image = Image.open(png).convert("RGB")
    background = Image.new("RGB", image.size, (255, 255, 255))
    box = ImageChops.difference(image, background).getbbox()
    if box is not None:
        image = image.crop((0, 0, image.width, min(image.height, box[3] + 24)))
    (ROOT / "docs").mkdir(exist_ok=True)
    small = image.quantize(colors=32)
    small.save(ROOT / "docs" / "status-page.png", optimize=True)


async def _token_proxy(tmp_path: Path, nursery: trio.Nursery) -> Any:
    up = await start_upstream(nursery, http_handler(b"ok\n"))
    cfg = base_config(
        tmp_path,
        [{"sni": ["*"], "default": True, "upstreams": [up.addr]}],
        admin={"listen": "127.0.0.1:0", "token": TOKEN, "metrics_token": METRICS_TOKEN},
        on_demand={"allow": [], "registry": True},
    )
    return running_proxy(tmp_path, cfg)


async def _register(url: str, name: str) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Edgeproxy-Request": "1"}
    async with httpx.AsyncClient(base_url=url, headers=headers, trust_env=False) as api:
        r = await api.post("/v1/hostnames", json={"hostname": name, "issue": False})
        assert r.status_code == 201, r.text


@needs_chromium
async def test_with_a_token_the_page_asks_for_it_and_shows_no_data_before(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with await _token_proxy(tmp_path, nursery) as p:
        assert p.rt.admin_bound is not None
        url = "http://{}:{}".format(*p.rt.admin_bound)
        await _register(url, "private.customer.test")
        with chromium(tmp_path / "screenshots") as b:
            await b.get(f"{url}/ui/")
            source = await b.run(lambda: b.driver.page_source)
            assert "private.customer.test" not in source
            assert await b.run(lambda: _by_css(b.driver, "#hostnames")) == []
            assert await b.run(lambda: len(_by_css(b.driver, "label[for=token]"))) == 1
            await b.screenshot("sign-in")

            async def sign_in(token: str) -> None:
                def act() -> None:
                    box = _by_css(b.driver, "input#token")[0]
                    box.clear()
                    box.send_keys(token)
                    _by_css(b.driver, "form.login button")[0].click()

                await b.navigate(act)

            await sign_in("wrong")
            assert "not the admin token" in await _text(b, "#login-error")
            assert "private.customer.test" not in await b.run(lambda: b.driver.page_source)
            await sign_in(TOKEN)
            assert await _rows(b) == [("private.customer.test", "pending")]
            cookies = await b.run(lambda: b.driver.get_cookies())
            assert [c["name"] for c in cookies] == ["edgeproxy_ui"]
            assert TOKEN not in cookies[0]["value"]
            assert cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict"
            assert "expiry" not in cookies[0]  # a session cookie: gone with the browser session
            # The session cookie is the page's only: the API still wants the bearer token.
            assert not await b.run(lambda: b.driver.get_cookie("edgeproxy_ui") is None)
            await b.get(f"{url}/v1/hostnames")
            assert "unauthorized" in await b.run(lambda: b.driver.page_source)
            await b.get(f"{url}/ui/")
            await b.navigate(lambda: _by_css(b.driver, "form.signout button")[0].click())
            assert await b.run(lambda: len(_by_css(b.driver, "input#token"))) == 1


async def test_page_auth_cookie_and_cross_site_checks_over_http(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with await _token_proxy(tmp_path, nursery) as p:
        assert p.rt.admin_bound is not None
        url = "http://{}:{}".format(*p.rt.admin_bound)
        host = urlsplit(url).netloc
        await _register(url, "private.customer.test")
        async with httpx.AsyncClient(base_url=url, trust_env=False) as c:
            page = await c.get("/ui/")
            assert page.status_code == 401
            assert "private.customer.test" not in page.text
            assert page.headers["content-security-policy"] == CSP
            assert "script" not in page.text.lower()
            metrics_only = await c.get("/ui/", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
            assert metrics_only.status_code == 401
            async with httpx.AsyncClient(base_url=url, trust_env=False) as forger:
                forger.cookies.set("edgeproxy_ui", f"{int(time.time())}.{'0' * 64}")
                assert (await forger.get("/ui/")).status_code == 401
            as_script = await c.get("/ui/", headers={"Authorization": f"Bearer {TOKEN}"})
            assert as_script.status_code == 200 and "private.customer.test" in as_script.text

            form = {"token": TOKEN}
            for headers in (
                {},  # no Origin: not our form
                {"Origin": "http://evil.example"},
                {"Origin": f"http://{host}", "Sec-Fetch-Site": "cross-site"},
            ):
                refused = await c.post("/ui/login", data=form, headers=headers)
                assert refused.status_code == 403, headers
                assert "set-cookie" not in refused.headers
            signed = await c.post("/ui/login", data=form, headers={"Origin": f"http://{host}"})
            assert signed.status_code == 303
            cookie = signed.headers["set-cookie"].lower()
            for flag in ("httponly", "samesite=strict", "path=/ui/"):
                assert flag in cookie, cookie
            assert "expires" not in cookie and "max-age" not in cookie
            page = await c.get("/ui/")  # the client kept the cookie
            assert page.status_code == 200 and "private.customer.test" in page.text
            doctor = await c.post("/ui/hostnames/private.customer.test/doctor")
            assert doctor.status_code == 403  # the cookie alone is not enough: no Origin
            bad = await c.get("/ui/", params={"state": "bogus", "q": "<script>"})
            assert bad.status_code == 400 and "<script>" not in bad.text


async def test_without_a_token_the_page_answers_loopback_hosts_only(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    up = await start_upstream(nursery, http_handler(b"ok\n"))
    cfg = base_config(
        tmp_path,
        [{"sni": ["*"], "default": True, "upstreams": [up.addr]}],
        admin={"listen": "127.0.0.1:0"},
    )
    async with running_proxy(tmp_path, cfg) as p:
        assert p.rt.admin_bound is not None
        url = "http://{}:{}".format(*p.rt.admin_bound)
        async with httpx.AsyncClient(base_url=url, trust_env=False) as c:
            assert (await c.get("/ui/")).status_code == 200
            rebound = await c.get("/ui/", headers={"Host": "attacker.example"})
            assert rebound.status_code == 403
            assert (await c.get("/ui")).headers["location"] == "/ui/"
            css = await c.get("/ui/ui.css")
            assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # chromedriver and selenium talk over loopback HTTP; a proxy in the environment must not
    # see it (nor the page's requests).
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
