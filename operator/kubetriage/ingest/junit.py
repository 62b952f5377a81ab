"""JUnit XML (pytest, Playwright, Maven/JUnit) -> one TriageJob per failed or errored testcase.

The XML is untrusted: it is parsed with expat directly, refusing any DOCTYPE,
entity declaration or external entity before a single entity is expanded
(billion laughs, XXE), and bounding depth and element count. The stdlib's
ElementTree alone would refuse external entities but expand internal ones.

Playwright writes attachments into system-out as ``[[ATTACHMENT|path]]``; with
``attachments_url`` they become links (images also become screenshots the
vision analyzer can fetch). With retries, ``rerunFailure``/``rerunError`` are
earlier failed attempts of a test that failed in the end (attempt history),
and ``flakyFailure``/``flakyError`` mark a test that passed on retry: it is
counted as flaky, not triaged (it did not fail).

Names and test ids from the report are cut to the CRD limits rather than
refused: a report is machine output, and one odd test must not lose the others.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote
from xml.parsers import expat

from pydantic import ValidationError

from kubetriage.api.keys import ATTACHMENTS, INGEST_LABEL, JUNIT_RUN_LABEL, SUBMITTED_BY
from kubetriage.api.models import (
    MAX_ERROR,
    MAX_LOGS,
    MAX_NAME,
    MAX_SCREENSHOTS,
    AttemptRecord,
    Screenshot,
    ScriptResult,
    Source,
    SourceType,
    TriageJobSpec,
)
from kubetriage.ingest.jobs import (
    IngestError,
    ingest_key,
    job_body,
    label_value,
    short_hash,
    slug,
    truncate,
    validation_error,
)

MAX_DEPTH = 64
MAX_ELEMENTS = 200_000
MAX_FAILED_CASES = 500  # jobs per upload; a run where everything failed is one problem, not 5000 LLM calls
ATTACHMENT = re.compile(r"\[\[ATTACHMENT\|([^\]\r\n]{1,1024})\]\]")
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".gif": "image/gif"}


class _Refused(Exception):
    pass


def parse_xml(data: bytes) -> ET.Element:
    """A tree from untrusted XML bytes, or IngestError 400 saying what was refused."""

    def refuse(*_: Any) -> None:
        raise _Refused("DOCTYPE and ENTITY declarations are not accepted (no DTDs, no entity expansion)")

    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    parser.buffer_text = True
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    depth = count = 0

    def start(tag: str, attrs: dict[str, str]) -> None:
        nonlocal depth, count
        depth += 1
        count += 1
        if depth > MAX_DEPTH:
            raise _Refused(f"XML nested deeper than {MAX_DEPTH} elements")
        if count > MAX_ELEMENTS:
            raise _Refused(f"more than {MAX_ELEMENTS} XML elements")
        builder.start(tag, attrs)

    def end(tag: str) -> None:
        nonlocal depth
        depth -= 1
        builder.end(tag)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
    except _Refused as exc:
        raise IngestError(400, str(exc)) from None
    except expat.ExpatError as exc:
        raise IngestError(400, f"not well-formed XML: {exc}") from None
    return builder.close()


# --------------------------------------------------------------------------- report model


@dataclass
class Attempt:
    kind: str  # element name: failure, error, rerunFailure, flakyFailure, ...
    type: str
    message: str
    text: str


@dataclass
class Case:
    suite: str
    classname: str
    name: str
    outcome: str  # passed | failed | error | skipped | flaky
    time: float | None = None
    file: str = ""
    final: Attempt | None = None
    reruns: list[Attempt] = field(default_factory=list)
    system_out: str = ""
    system_err: str = ""
    attachments: list[str] = field(default_factory=list)


def _text(el: ET.Element | None) -> str:
    return "".join(el.itertext()) if el is not None else ""


def _attempt(el: ET.Element) -> Attempt:
    text = el.text or ""
    trace = el.find("stackTrace")  # surefire puts rerun stack traces in a child
    if trace is not None:
        text = _text(trace)
    return Attempt(el.tag, el.get("type", ""), el.get("message", ""), text.strip())


def _seconds(value: str | None) -> float | None:
    try:
        t = float((value or "").replace(",", ""))
    except ValueError:
        return None
    return t if 0 <= t <= 7 * 24 * 3600 else None


def parse_report(data: bytes) -> tuple[list[Case], dict[str, int]]:
    """Every testcase with its outcome, and counts by outcome."""
    root = parse_xml(data)
    if root.tag not in ("testsuites", "testsuite"):
        raise IngestError(422, f"not a JUnit report: the root element is <{root.tag[:64]}>, "
                               "expected <testsuites> or <testsuite>", "body")
    cases: list[Case] = []
    suites = [root] if root.tag == "testsuite" else []
    suites += [s for s in root.iter("testsuite") if s is not root]
    for suite in suites:
        for tc in suite.findall("testcase"):
            cases.append(_case(suite.get("name", ""), tc))
    summary = {k: 0 for k in ("tests", "passed", "failed", "error", "skipped", "flaky")}
    summary["tests"] = len(cases)
    for c in cases:
        summary[c.outcome] += 1
    return cases, summary


def _case(suite: str, tc: ET.Element) -> Case:
    case = Case(suite=suite, classname=tc.get("classname", ""), name=tc.get("name", ""), outcome="passed",
                time=_seconds(tc.get("time")), file=tc.get("file", ""))
    outs, errs = [_text(tc.find("system-out"))], [_text(tc.find("system-err"))]
    for child in tc:
        if child.tag in ("failure", "error") and case.final is None:
            case.final = _attempt(child)
            case.outcome = "failed" if child.tag == "failure" else "error"
        elif child.tag in ("rerunFailure", "rerunError", "flakyFailure", "flakyError"):
            case.reruns.append(_attempt(child))
            outs.append(_text(child.find("system-out")))
            errs.append(_text(child.find("system-err")))
        elif child.tag == "skipped" and case.outcome == "passed":
            case.outcome = "skipped"
    if case.final is None and any(r.kind.startswith("flaky") for r in case.reruns):
        case.outcome = "flaky"
    case.system_out = "\n".join(o for o in outs if o.strip())
    case.system_err = "\n".join(e for e in errs if e.strip())
    seen: set[str] = set()
    for m in ATTACHMENT.finditer(case.system_out + "\n" + case.system_err):
        path = m.group(1).strip()
        if path and path not in seen:
            seen.add(path)
            case.attachments.append(path)
    return case


# --------------------------------------------------------------------------- jobs


@dataclass
class UploadOptions:
    """Query parameters of an upload (or CLI flags)."""

    run: str = ""  # CI run id: re-uploading the same run's report is idempotent even if the file changed
    script: str = ""  # scriptName for every job (default: the testcase's classname, else its suite)
    report_url: str | None = None
    attachments_url: str | None = None  # base URL where the report's attachment paths are served
    commit: str | None = None
    priority_class: str | None = None
    pool: str | None = None
    submitted_by: str | None = None


def _link(base: str, path: str) -> str:
    clean = posixpath.normpath(path.replace("\\", "/")).lstrip("/")
    return base.rstrip("/") + "/" + quote(clean)


def case_job(case: Case, run_key: str, occurrence: int, opts: UploadOptions) -> tuple[str, dict[str, Any]]:
    test_id = f"{case.classname}::{case.name}" if case.classname else case.name
    identity = (run_key, case.suite, case.classname, case.name, str(occurrence))
    name = f"ju-{slug(case.name or case.classname, 40, 'test')}-" + short_hash(*identity, length=12)
    final = case.final or Attempt("failure", "", "", "")
    error = f"{final.type}: {final.message}" if final.type and final.message else (final.message or final.type)
    if final.text and final.text not in error:
        error = f"{error}\n\n{final.text}" if error else final.text
    links = [_link(opts.attachments_url, p) for p in case.attachments] if opts.attachments_url else []
    shots = [
        Screenshot(name=posixpath.basename(p)[:256], url=link)
        for p, link in zip(case.attachments, links, strict=False)
        if posixpath.splitext(p.lower())[1] in IMAGE_TYPES and len(link) <= 2048
    ][:MAX_SCREENSHOTS]
    header = ""
    if case.attachments:
        header = "Attachments:\n" + "\n".join(f"  {x}" for x in (links or case.attachments)) + "\n\n"
    logs = case.system_out + (f"\n--- system-err ---\n{case.system_err}" if case.system_err else "")
    logs = header + (truncate(logs, MAX_LOGS - len(header), keep="tail") or "") if (logs or header) else ""
    try:
        spec = TriageJobSpec(
            source=Source(type=SourceType.SCRIPT_RESULT),
            priority_class_name=opts.priority_class,
            pool=opts.pool,
            script_result=ScriptResult(
                script_name=(opts.script or case.classname or case.suite or "junit")[:MAX_NAME],
                success=False,
                test_case=test_id[: MAX_NAME * 2],
                error_message=truncate(error or f"{case.outcome} without a message", MAX_ERROR),
                logs_excerpt=logs[:MAX_LOGS] or None,
                report_url=opts.report_url,
                screenshots=shots or None,
                duration_seconds=case.time,
                attempt=1 + len(case.reruns) if case.reruns else None,
                commit=opts.commit,
                history=[AttemptRecord(success=False, error_message=(f"{r.type}: {r.message}".strip(": "))[:1024])
                         for r in case.reruns][-50:] or None,
            ),
        )
    except ValidationError as exc:
        raise validation_error(exc, f"testcase {test_id[:200]!r}: spec") from None
    labels = {INGEST_LABEL: "junit", JUNIT_RUN_LABEL: label_value(run_key) or "run"}
    annotations: dict[str, str] = {}
    if links:
        annotations[ATTACHMENTS] = json.dumps(links[:100])[:65536]
    if opts.submitted_by:
        annotations[SUBMITTED_BY] = opts.submitted_by
    return name, job_body(name, spec, labels, annotations, key=ingest_key("junit", *identity))


def report_jobs(data: bytes, opts: UploadOptions) -> tuple[list[tuple[str, dict[str, Any], Case]], dict[str, int]]:
    """The jobs for an upload: one per failed/errored testcase; IngestError if the report is unusable."""
    cases, summary = parse_report(data)
    failing = [c for c in cases if c.outcome in ("failed", "error")]
    if len(failing) > MAX_FAILED_CASES:
        raise IngestError(413, f"{len(failing)} failed testcases in one upload (the limit is {MAX_FAILED_CASES}): "
                               "split the report, or triage the run as one script result")
    run_key = opts.run or "sha256-" + hashlib.sha256(data).hexdigest()[:16]
    seen: dict[tuple[str, str, str], int] = {}
    jobs = []
    for case in failing:
        key = (case.suite, case.classname, case.name)
        seen[key] = seen.get(key, 0) + 1
        name, body = case_job(case, run_key, seen[key], opts)
        jobs.append((name, body, case))
    return jobs, summary
