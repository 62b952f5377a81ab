"""kubetriage: a Kubernetes operator that triages alerts and failed test runs with AI."""

__version__ = "0.1.0"
