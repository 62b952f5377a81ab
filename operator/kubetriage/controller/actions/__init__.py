"""Actions on verdicts: what TriagePolicies make the operator do after a verdict is recorded.

- ``state``: the policy cache and the in-memory bookkeeping (what is due, silences held, retries);
- ``policies``: the TriagePolicy watch (cache and ``Accepted`` condition);
- ``plan``: the entries a verdict gets in ``status.actions``, written with the verdict itself;
- ``executor``: the leader-only loop that carries out ``Pending`` entries and lifts silences;
- one module per sink behind one interface (``sinks.Sink``): ``silence`` (Alertmanager), ``webhook``, ``slack``;
- ``secrets`` (Secrets the chart mounts into the operator) and ``http`` (outbound requests under the URL policy).

Nothing here imports ``controller.runtime`` at package import time: ``Runtime`` holds the state.
"""
