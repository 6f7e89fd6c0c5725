"""`edgeproxy hostnames add|remove|list|show|import` as real subprocesses on the deployment's
storage, and a running proxy following what they change."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from edgeproxy.storage import FileStorage
from testkit.cli import cli, write_config
from testkit.proxy import running_proxy


async def test_import_reports_bad_lines_by_number_and_keeps_the_good_ones(tmp_path: Path) -> None:
    config, _ = write_config(tmp_path)
    lines = [
        "# customers of 2026-12",                                          # 1 comment
        "one.customer.test",                                               # 2
        "Two.Customer.TEST.",                                              # 3 normalised
        "bad_name!.customer.test",                                         # 4 bad
        "",                                                                # 5 blank
        "192.0.2.10",                                                      # 6 IP literal
        '{"hostname": "three.customer.test", "upstream": "10.0.0.3:80", "metadata": {"id": 3}}',
        "{not json",                                                       # 8 bad
        '{"hostname": "four.customer.test", "colour": "red"}',             # 9 bad field
        '{"hostname": "five.customer.test", "metadata": {"x": "' + "y" * 5000 + '"}}',  # 10
        '{"hostname": "six.customer.test", "upstream": "nowhere"}',        # 11 bad upstream
        "one.customer.test",                                               # 12 duplicate: fine
    ]  # fmt: skip
    names = tmp_path / "names.txt"
    names.write_text("\n".join(lines) + "\n")
    res = await cli("hostnames", "import", str(names), "-c", str(config))
    assert res.returncode == 1
    # Bad lines are "FILE:LINE: why"; a slow machine adds progress lines ("hostnames: N/TOTAL").
    err = [e for e in res.stderr.decode().splitlines() if e.startswith(f"{names}:")]
    assert [e.split(":")[1] for e in err] == ["4", "6", "8", "9", "10", "11"], err
    assert "IP address" in err[1] and "not valid JSON" in err[2] and "colour" in err[3]
    assert "limit is 4096" in err[4] and "upstream" in err[5]
    assert b"3 added, 1 already registered, 6 bad line(s)" in res.stdout
    storage = FileStorage(tmp_path / "state")
    stored = {e.hostname: e for e in await storage.list_hostnames()}
    assert sorted(stored) == ["one.customer.test", "three.customer.test", "two.customer.test"]
    assert stored["three.customer.test"].upstream == "10.0.0.3:80"
    assert stored["three.customer.test"].metadata == '{"id":3}'


async def test_add_show_list_remove_and_a_running_proxy_follows(tmp_path: Path) -> None:
    config, cfg = write_config(tmp_path)
    async with running_proxy(tmp_path, cfg) as p:
        res = await cli("hostnames", "add", "shop.customer.test", "--upstream", "10.0.0.9:8080",
                        "--metadata", '{"plan": "pro"}', "-c", str(config))  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert res.stdout == b"shop.customer.test: added\n"
        again = await cli("hostnames", "add", "shop.customer.test", "-c", str(config))
        assert b"already registered" in again.stdout
        with trio.fail_after(10):
            while not p.rt.hostnames.is_registered("shop.customer.test"):
                await trio.sleep(0.05)
        shown = await cli("hostnames", "show", "shop.customer.test", "--json", "-c", str(config))
        d = json.loads(shown.stdout)
        assert d["upstream"] == "10.0.0.9:8080" and d["metadata"] == {"plan": "pro"}
        assert d["state"] == "pending"
        listed = await cli("hostnames", "list", "--json", "-c", str(config))
        assert [json.loads(x)["hostname"] for x in listed.stdout.splitlines()] == [
            "shop.customer.test"
        ]
        removed = await cli("hostnames", "remove", "shop.customer.test", "-c", str(config))
        assert removed.returncode == 0
        with trio.fail_after(10):
            while not p.rt.hostnames.is_removed("shop.customer.test"):
                await trio.sleep(0.05)
        only_removed = await cli("hostnames", "list", "--state", "removed", "-c", str(config))
        assert b"shop.customer.test" in only_removed.stdout and b"removed" in only_removed.stdout
    for bad, words in (
        (["add", "10.0.0.1"], b"IP address"),
        (["add", "x.customer.test", "--metadata", "[1]"], b"JSON object"),
        (["add", "x.customer.test", "--metadata", "{"], b"not valid JSON"),
        (["show", "never.customer.test"], b"not a registered hostname"),
        (["remove", "never.customer.test"], b"not a registered hostname"),
    ):
        res = await cli("hostnames", *bad, "-c", str(config))
        assert res.returncode in (1, 2) and words in res.stderr, (bad, res.stderr)
    assert [e.hostname for e in await FileStorage(tmp_path / "state").list_hostnames()] == [
        "shop.customer.test"
    ]
