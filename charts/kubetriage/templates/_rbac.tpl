{{/* RBAC rule blocks shared by the ClusterRole (cluster-wide mode) and the per-namespace Roles. */}}

{{- define "kubetriage.rbac.triageRules" -}}
# Admission and the Redis-loss rebuild: list/watch every job (kopf), get one
# (re-admitting a waiting job, linking a duplicate to its primary).
- apiGroups: [kubetriage.io]
  resources: [triagejobs]
  verbs: [get, list, watch]
# Phase, verdict and conditions: the operator is the only writer of job status.
- apiGroups: [kubetriage.io]
  resources: [triagejobs/status]
  verbs: [patch]
# Pools: kopf's watch, and the finalizer kopf's daemon (the pool's control
# loop) keeps on each pool so it can stop the loop before the pool is gone.
- apiGroups: [kubetriage.io]
  resources: [triagepools]
  verbs: [list, watch, patch]
- apiGroups: [kubetriage.io]
  resources: [triagepools/status]
  verbs: [patch]
# The worker Deployment has an ownerReference with blockOwnerDeletion to its
# pool; clusters with the OwnerReferencesPermissionEnforcement admission
# plugin (OpenShift, hardened clusters) require this. It grants nothing else.
- apiGroups: [kubetriage.io]
  resources: [triagepools/finalizers]
  verbs: [update]
# One Event per finished job (Triaged / TriageFailed).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}
{{- define "kubetriage.rbac.deploymentRules" -}}
# The worker Deployment of each pool, written with server-side apply (a PATCH
# that creates the object the first time, hence create as well).
- apiGroups: [apps]
  resources: [deployments]
  verbs: [create, patch]
{{- end }}

{{- define "kubetriage.rbac.ingestRules" -}}
# The ingest endpoint: create the TriageJobs it receives, and mark a job whose
# alert resolved (labels and an annotation; read first to stay idempotent).
- apiGroups: [kubetriage.io]
  resources: [triagejobs]
  verbs: [get, create, patch]
{{- end }}
