"""JUnit uploads: a real pytest run's --junitxml report, and a Playwright-style report with retries and attachments."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import pytest

from devharness import devenv
from kubetriage.api.keys import JUNIT_RUN_LABEL
from kubetriage.ingest.junit import ATTACHMENTS, parse_report
from tests.ingestenv import IngestEnv

pytestmark = pytest.mark.cluster

SEP = " \u203a "  # Playwright joins describe() titles with a single right-pointing angle quote

SUITE = '''
import pytest


def test_pass():
    pass


def test_total_is_wrong():
    print("cart: 3 items, total computed as 0")
    assert 1 + 1 == 3, "total was 0"


@pytest.fixture
def db():
    raise ConnectionError("db-1:5432 refused")


def test_uses_db(db):
    pass


@pytest.mark.skip(reason="later")
def test_skipped():
    pass


@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    assert n == 1


class TestCheckout:
    def test_pay(self):
        raise TimeoutError("page.goto: Timeout 30000ms exceeded")
'''

PLAYWRIGHT = b"""<?xml version="1.0" encoding="UTF-8"?>
<testsuites id="" name="" tests="4" failures="2" skipped="0" errors="1" time="14.2">
<testsuite name="login.spec.ts" timestamp="2026-01-05T10:00:00.000Z" hostname="chromium" tests="4" failures="2"
  skipped="0" time="12.1" errors="1">
<testcase name="login \xe2\x80\xba shows dashboard" classname="login.spec.ts" time="5.2">
<failure message="login.spec.ts:12:5 shows dashboard" type="FAILURE">
<![CDATA[  Error: Timed out 5000ms waiting for expect(locator).toBeVisible()
    Locator: getByText('Dashboard')
]]>
</failure>
<system-out>
<![CDATA[navigating to /login
[[ATTACHMENT|test-results/login-shows-dashboard-chromium/test-failed-1.png]]
[[ATTACHMENT|test-results/login-shows-dashboard-chromium/trace.zip]]
]]>
</system-out>
</testcase>
<testcase name="login \xe2\x80\xba remembers me" classname="login.spec.ts" time="3.1">
<flakyFailure message="expect(received).toBe(expected)" type="Error"><![CDATA[first attempt failed]]></flakyFailure>
</testcase>
<testcase name="login \xe2\x80\xba logout" classname="login.spec.ts" time="2.0">
<failure message="locator.click: Timeout 3000ms exceeded" type="TimeoutError"><![CDATA[at logout.ts:4]]></failure>
<rerunFailure message="locator.click: Timeout 3000ms exceeded" type="TimeoutError"><![CDATA[retry 1]]></rerunFailure>
<rerunFailure message="locator.click: Timeout 3000ms exceeded" type="TimeoutError"><![CDATA[retry 2]]></rerunFailure>
</testcase>
<testcase name="login \xe2\x80\xba slow" classname="login.spec.ts" time="30.0">
<error message="Test timeout of 30000ms exceeded." type="TimeoutError"/>
</testcase>
</testsuite>
</testsuites>
"""


@pytest.fixture(scope="module")
async def env(cluster: devenv.ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[IngestEnv]:
    async with IngestEnv(cluster, tmp_path_factory.mktemp("junit")) as e:
        yield e


@pytest.fixture(scope="module")
async def pytest_report(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real report: pytest run on a small failing suite, with output captured into the XML."""
    root = tmp_path_factory.mktemp("suite")
    (root / "test_shop.py").write_text(textwrap.dedent(SUITE))
    (root / "pytest.ini").write_text("[pytest]\n")  # keep this repository's settings out of the run
    report = root / "report.xml"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pytest", str(root), f"--junitxml={report}", "-o", "junit_logging=all",
        "-p", "no:cacheprovider", "-c", str(root / "pytest.ini"), "--rootdir", str(root), "-q",
        cwd=root, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 1, out.decode()  # 1 = tests failed, as intended
    return report.read_bytes()


def _by_test(jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {j["spec"]["scriptResult"]["testCase"]: j for j in jobs}


async def test_pytest_report_makes_one_job_per_failed_or_errored_test(env: IngestEnv, pytest_report: bytes) -> None:
    resp = await env.post("/v1/junit", content=pytest_report, headers={"Content-Type": "application/xml"},
                          params={"report_url": "https://ci.example.com/build/7/report.html", "commit": "3f9c2ab"})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["summary"] == {"tests": 7, "passed": 2, "failed": 3, "error": 1, "skipped": 1, "flaky": 0}
    assert body["created"] == 4
    jobs = _by_test(await env.jobs())
    assert set(jobs) == {"test_shop::test_total_is_wrong", "test_shop::test_uses_db", "test_shop::test_param[2]",
                         "test_shop.TestCheckout::test_pay"}
    wrong = jobs["test_shop::test_total_is_wrong"]
    sr = wrong["spec"]["scriptResult"]
    assert wrong["spec"]["source"] == {"type": "scriptResult"}
    assert sr["scriptName"] == "test_shop" and sr["success"] is False
    assert "total was 0" in sr["errorMessage"] and "assert" in sr["errorMessage"]
    assert "cart: 3 items, total computed as 0" in sr["logsExcerpt"]
    assert sr["reportURL"] == "https://ci.example.com/build/7/report.html" and sr["commit"] == "3f9c2ab"
    assert sr["durationSeconds"] >= 0
    assert "ConnectionError: db-1:5432 refused" in jobs["test_shop::test_uses_db"]["spec"]["scriptResult"][
        "errorMessage"]
    assert "Timeout 30000ms" in jobs["test_shop.TestCheckout::test_pay"]["spec"]["scriptResult"]["errorMessage"]
    assert all(j["metadata"]["name"].startswith("ju-") for j in jobs.values())
    assert all(j["metadata"]["labels"]["kubetriage.io/ingest"] == "junit" for j in jobs.values())

    again = await env.post("/v1/junit", content=pytest_report)
    assert again.status_code == 200 and again.json()["exists"] == 4
    assert len(await env.jobs()) == 4


async def test_a_run_id_names_the_jobs_and_multipart_uploads_work(env: IngestEnv, pytest_report: bytes) -> None:
    params = {"run": "build-42", "namespace": env.ns2, "script": "shop-suite"}
    resp = await env.post("/v1/junit", params=params, files={"file": ("report.xml", pytest_report, "text/xml")})
    assert resp.status_code == 201, resp.text
    jobs = await env.jobs(env.ns2)
    assert len(jobs) == 4
    assert {j["metadata"]["labels"][JUNIT_RUN_LABEL] for j in jobs} == {"build-42"}
    assert {j["spec"]["scriptResult"]["scriptName"] for j in jobs} == {"shop-suite"}
    # the same run uploaded again (a regenerated file): the same jobs
    changed = pytest_report.replace(b"<testsuites", b"<!-- regenerated --><testsuites", 1)
    resp = await env.post("/v1/junit", params=params, content=changed)
    assert resp.status_code == 200 and resp.json()["exists"] == 4


async def test_playwright_report_with_retries_and_attachments(env: IngestEnv) -> None:
    params = {"namespace": env.ns2, "run": "pw-9", "attachments_url": "https://ci.example.com/artifacts/9/",
              "priority_class": "kubetriage-p3"}
    resp = await env.post("/v1/junit", params=params, content=PLAYWRIGHT)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["summary"] == {"tests": 4, "passed": 0, "failed": 2, "error": 1, "skipped": 0, "flaky": 1}
    jobs = _by_test([j for j in await env.jobs(env.ns2) if j["metadata"]["labels"][JUNIT_RUN_LABEL] == "pw-9"])
    assert set(jobs) == {f"login.spec.ts::login{SEP}shows dashboard", f"login.spec.ts::login{SEP}logout",
                         f"login.spec.ts::login{SEP}slow"}
    dash = jobs[f"login.spec.ts::login{SEP}shows dashboard"]
    sr = dash["spec"]["scriptResult"]
    png = "https://ci.example.com/artifacts/9/test-results/login-shows-dashboard-chromium/test-failed-1.png"
    trace = "https://ci.example.com/artifacts/9/test-results/login-shows-dashboard-chromium/trace.zip"
    assert sr["screenshots"] == [{"name": "test-failed-1.png", "url": png}]
    assert json.loads(dash["metadata"]["annotations"][ATTACHMENTS]) == [png, trace]
    assert sr["logsExcerpt"].startswith("Attachments:\n") and trace in sr["logsExcerpt"]
    assert "FAILURE: login.spec.ts:12:5 shows dashboard" in sr["errorMessage"]
    assert "toBeVisible" in sr["errorMessage"]
    assert dash["spec"]["priorityClassName"] == "kubetriage-p3"
    logout = jobs[f"login.spec.ts::login{SEP}logout"]["spec"]["scriptResult"]
    assert logout["attempt"] == 3 and len(logout["history"]) == 2
    assert logout["history"][0] == {"success": False, "errorMessage": "TimeoutError: locator.click: Timeout 3000ms "
                                                                      "exceeded"}
    slow = jobs[f"login.spec.ts::login{SEP}slow"]["spec"]["scriptResult"]
    assert slow["errorMessage"] == "TimeoutError: Test timeout of 30000ms exceeded."


async def test_too_many_failures_in_one_upload_is_413_and_creates_nothing(env: IngestEnv) -> None:
    cases = "".join(f'<testcase classname="c" name="t{i}"><failure message="x"/></testcase>' for i in range(501))
    before = len(await env.jobs(env.team_ns))
    resp = await env.post("/v1/junit", token=env.team_token, content=f"<testsuite>{cases}</testsuite>".encode())
    assert resp.status_code == 413 and "501 failed testcases" in resp.json()["error"]
    assert len(await env.jobs(env.team_ns)) == before


def test_parse_report_reads_nested_suites_and_skips() -> None:
    xml = b"""<testsuites><testsuite name="outer"><testsuite name="inner">
      <testcase classname="a" name="ok" time="1,234.5"/><testcase classname="a" name="skip"><skipped/></testcase>
      <testcase classname="a" name="bad"><failure>no message, only text</failure></testcase>
    </testsuite></testsuite></testsuites>"""
    cases, summary = parse_report(xml)
    assert summary == {"tests": 3, "passed": 1, "failed": 1, "error": 0, "skipped": 1, "flaky": 0}
    assert cases[0].time == 1234.5 and cases[0].suite == "inner"
    assert cases[2].final is not None and cases[2].final.text == "no message, only text"
