{{/* RBAC rule blocks shared by the ClusterRole (cluster-wide mode) and the per-namespace Roles. */}}

{{- define "kubetriage.rbac.triageRules" -}}
# Admission and the Redis-loss rebuild: list/watch every job (kopf), get one
# (re-admitting a waiting job, linking a duplicate to its primary).
- apiGroups: [kubetriage.io]
  resources: [triagejobs]
  verbs: [get, list, watch]
# TTL: finished jobs are deleted ttlSecondsAfterFinished after they finished
# (their verdicts stay in the database). The operator's only delete.
- apiGroups: [kubetriage.io]
  resources: [triagejobs]
  verbs: [delete]
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
# TriageRules: kopf's watch fills the per-namespace cache admission hands to
# workers (the startup listing too). No get and no patch of the rule itself:
# its handler is on.event, so kopf keeps no annotations or finalizer on rules.
- apiGroups: [kubetriage.io]
  resources: [triagerules]
  verbs: [list, watch]
# The rule's Accepted condition (an errorRegex RE2 cannot compile is reported
# there), written once per generation of the rule.
- apiGroups: [kubetriage.io]
  resources: [triagerules/status]
  verbs: [patch]
# TriagePolicies: the watch fills the per-namespace cache verdicts are acted
# on from (the startup listing too); like rules, no get and no patch of the
# policy itself, only its Accepted condition.
- apiGroups: [kubetriage.io]
  resources: [triagepolicies]
  verbs: [list, watch]
- apiGroups: [kubetriage.io]
  resources: [triagepolicies/status]
  verbs: [patch]
# One Event per finished job (Triaged / TriageFailed), and per action taken.
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
