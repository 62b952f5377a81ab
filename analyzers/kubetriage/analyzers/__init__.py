"""Pure analysis engines: an AnalysisRequest in, a Verdict out. No Kubernetes, no Redis."""
