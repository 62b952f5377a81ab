"""Every label and annotation key kubetriage reads or writes on Kubernetes objects, defined once."""

from __future__ import annotations

from kubetriage.api.models import GROUP

# Written by ingest on the TriageJobs it creates; read by the operator and the CLI.
INGEST_LABEL = f"{GROUP}/ingest"  # alertmanager | script-result | junit
ALERT_STATUS_LABEL = f"{GROUP}/alert-status"  # firing | resolved
ALERT_FINGERPRINT_LABEL = f"{GROUP}/alert-fingerprint"
JUNIT_RUN_LABEL = f"{GROUP}/junit-run"
RESOLVED_AT = f"{GROUP}/resolved-at"
SUBMITTED_BY = f"{GROUP}/submitted-by"
GROUP_KEY = f"{GROUP}/alert-group-key"
ATTACHMENTS = f"{GROUP}/attachments"  # JUnit attachment links, JSON
# sha256 of exactly what ingest derived the job's name from: a 409 with the same key is a re-send, another is a
# name collision, reported (never taken for a re-send, which would drop the row)
INGEST_KEY = f"{GROUP}/ingest-key"

# The human override, set by ``kubetriage verdict set`` or ``kubectl annotate``; recorded with check_type 'user'.
VERDICT = f"{GROUP}/verdict"
VERDICT_REASON = f"{GROUP}/verdict-reason"
VERDICT_BY = f"{GROUP}/verdict-by"
VERDICT_AT = f"{GROUP}/verdict-at"

# On worker Deployments: which TriagePool they serve.
POOL_LABEL = f"{GROUP}/pool"
