{{/* Names and labels shared by every template. */}}

{{- define "kubetriage.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetriage.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Cluster-scoped objects carry the namespace too: two releases must not fight over one ClusterRole. */}}
{{- define "kubetriage.clusterName" -}}
{{- printf "%s-%s" (include "kubetriage.fullname" .) .Release.Namespace | trunc 253 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetriage.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetriage.labels" -}}
helm.sh/chart: {{ include "kubetriage.chart" . }}
app.kubernetes.io/name: {{ include "kubetriage.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The operator's pods. */}}
{{- define "kubetriage.operatorSelector" -}}
app.kubernetes.io/name: {{ include "kubetriage.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The worker pods, as operator/kubetriage/controller/pools.py labels them (managed-by kubetriage, not by Helm). */}}
{{- define "kubetriage.workerSelector" -}}
app.kubernetes.io/name: kubetriage
app.kubernetes.io/component: worker
app.kubernetes.io/managed-by: kubetriage
{{- end -}}

{{- define "kubetriage.redisSelector" -}}
app.kubernetes.io/name: {{ include "kubetriage.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end -}}

{{- define "kubetriage.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetriage.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubetriage.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kubetriage.peeringName" -}}
{{- default (include "kubetriage.fullname" .) .Values.peering.name -}}
{{- end -}}

{{/*
The namespaces the operator watches, as a list (empty = cluster-wide). In
namespaced mode the release namespace is always one of them: the chart's
TriagePools live there and only watched pools get a control loop.
*/}}
{{- define "kubetriage.watchNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- toJson (uniq (append .Values.watchNamespaces .Release.Namespace)) -}}
{{- else -}}
[]
{{- end -}}
{{- end -}}

{{/* Namespaces where the operator may manage worker Deployments (unless rbac.poolsClusterWide). */}}
{{- define "kubetriage.poolNamespaces" -}}
{{- $ns := concat (list .Release.Namespace) .Values.rbac.poolNamespaces (.Values.watchNamespaces | default list) -}}
{{- toJson (uniq $ns) -}}
{{- end -}}

{{/* Redis: exactly one source. */}}
{{- define "kubetriage.redisMode" -}}
{{- $external := or .Values.redis.url .Values.redis.existingSecret -}}
{{- if and $external .Values.redis.bundled.enabled -}}
{{- fail "redis: set either redis.url / redis.existingSecret (external Redis) or redis.bundled.enabled=true, not both" -}}
{{- else if .Values.redis.existingSecret -}}
secret
{{- else if .Values.redis.url -}}
url
{{- else if .Values.redis.bundled.enabled -}}
bundled
{{- else -}}
{{- fail "redis: set redis.url, redis.existingSecret or redis.bundled.enabled=true: the operator needs a Redis" -}}
{{- end -}}
{{- end -}}

{{- define "kubetriage.redisBundledName" -}}
{{- printf "%s-redis" (include "kubetriage.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* TriagePool analyzer: the pool's own fields win over the llm.* defaults. */}}
{{- define "kubetriage.poolSpec" -}}
{{- $root := .root -}}
{{- $spec := deepCopy (.pool.spec | default dict) -}}
{{- $llm := dict "baseURL" $root.Values.llm.baseURL "timeoutSeconds" $root.Values.llm.timeoutSeconds -}}
{{- if $root.Values.llm.model }}{{ $_ := set $llm "model" $root.Values.llm.model }}{{ end -}}
{{- if $root.Values.llm.visionModel }}{{ $_ := set $llm "visionModel" $root.Values.llm.visionModel }}{{ end -}}
{{- if $root.Values.llm.allowHTTP }}{{ $_ := set $llm "allowHTTP" true }}{{ end -}}
{{- if $root.Values.llm.allowPrivateEndpoints }}{{ $_ := set $llm "allowPrivateEndpoints" true }}{{ end -}}
{{- if $root.Values.llm.existingSecret -}}
{{- $_ := set $llm "apiKeySecretRef" (dict "name" $root.Values.llm.existingSecret "key" $root.Values.llm.existingSecretKey) -}}
{{- end -}}
{{- $_ := set $spec "analyzer" (merge (deepCopy ($spec.analyzer | default dict)) $llm) -}}
{{- toYaml $spec -}}
{{- end -}}

{{- define "kubetriage.ingestNamespace" -}}
{{- default .Release.Namespace .Values.ingest.namespace -}}
{{- end -}}

{{/* Namespaces the ingest endpoint writes TriageJobs to (empty list when ingest is off). */}}
{{- define "kubetriage.ingestNamespaces" -}}
{{- if .Values.ingest.enabled -}}
{{- toJson (uniq (prepend .Values.ingest.allowedNamespaces (include "kubetriage.ingestNamespace" .))) -}}
{{- else -}}
[]
{{- end -}}
{{- end -}}

{{/* Secret name -> namespaces whose TriagePolicies may use it (actions.secrets), as JSON for the operator. */}}
{{- define "kubetriage.actionSecretNamespaces" -}}
{{- $out := dict -}}
{{- range .Values.actions.secrets -}}
{{- $_ := set $out .name .namespaces -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}
