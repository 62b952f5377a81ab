"""RE2, the one engine for team-written regular expressions (a TriageRule's ``errorRegex``).

Here in ``api`` because two layers must judge an expression the same way: the operator reports one that
does not compile on the rule's status (``Accepted=False``, ``InvalidRegex``), and the analyzers never
match a rule whose expression does not compile. RE2 runs in linear time, so an expression from a
resource cannot stall a worker on untrusted log text; compiling is pure computation, no I/O.
"""

from __future__ import annotations

import re2

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a bad expression is reported on the rule, not as a C++ log line per process


def compile_re2(pattern: str) -> re2._Regexp:
    """The compiled expression; raises ``re2.error`` when it does not compile."""
    return re2.compile(pattern, options=_OPTIONS)


def regex_problem(pattern: str) -> str | None:
    """Why an expression cannot be used, for the rule's status; None when it compiles."""
    try:
        compile_re2(pattern)
    except re2.error as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        return f"errorRegex does not compile (RE2 syntax): {detail}"
    return None
