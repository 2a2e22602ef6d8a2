{{/* The chart name, or nameOverride. */}}
{{- define "keygate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full resource name: "<release>-<chart>", or the release name alone when
it already contains the chart name. Truncated to 63 characters (DNS label);
suffixed resources (-migrate, -database) stay within the 63 of their kinds.
*/}}
{{- define "keygate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "keygate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every resource carries. */}}
{{- define "keygate.labels" -}}
helm.sh/chart: {{ include "keygate.chart" . }}
{{ include "keygate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The labels that identify this release's keygate objects. */}}
{{- define "keygate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keygate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The labels that select the serving pods only (not the migration Job's pod):
the Service, PodDisruptionBudget, NetworkPolicy and ServiceMonitor use them.
*/}}
{{- define "keygate.serverSelectorLabels" -}}
{{ include "keygate.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/* The ServiceAccount the pods run as. */}}
{{- define "keygate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "keygate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "keygate.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/* The Secret holding the database URL, and its key. */}}
{{- define "keygate.databaseSecretName" -}}
{{- if .Values.database.existingSecret }}
{{- .Values.database.existingSecret }}
{{- else }}
{{- printf "%s-database" (include "keygate.fullname" .) }}
{{- end }}
{{- end }}

{{- define "keygate.databaseSecretKey" -}}
{{- if .Values.database.existingSecret }}
{{- required "database.existingSecretKey is required with database.existingSecret" .Values.database.existingSecretKey }}
{{- else }}
{{- "database-url" }}
{{- end }}
{{- end }}

{{/* The ConfigMap holding the route policy, and its key. */}}
{{- define "keygate.policyConfigMapName" -}}
{{- if .Values.policy.existingConfigMap }}
{{- .Values.policy.existingConfigMap }}
{{- else }}
{{- printf "%s-policy" (include "keygate.fullname" .) }}
{{- end }}
{{- end }}

{{- define "keygate.policyConfigMapKey" -}}
{{- if .Values.policy.existingConfigMap }}
{{- required "policy.existingConfigMapKey is required with policy.existingConfigMap" .Values.policy.existingConfigMapKey }}
{{- else }}
{{- "policy.toml" }}
{{- end }}
{{- end }}

{{/* The Secret holding the client CA bundle for mTLS. */}}
{{- define "keygate.clientCASecretName" -}}
{{- default .Values.tls.secretName .Values.tls.clientCA.secretName }}
{{- end }}

{{/*
A keygate duration ("500ms", "20s", "5m", "2h", or bare seconds) in whole
seconds, rounded up; fails rendering on anything else, as keygate would.
*/}}
{{- define "keygate.durationSeconds" -}}
{{- $d := toString . | trim }}
{{- $n := regexFind "^[0-9]+" $d }}
{{- if not $n }}
{{- fail (printf "%q is not a duration like 20s, 5m or 500ms" $d) }}
{{- end }}
{{- $unit := trimPrefix $n $d }}
{{- $v := atoi $n }}
{{- if eq $unit "ms" }}
{{- div (add $v 999) 1000 }}
{{- else if or (eq $unit "") (eq $unit "s") }}
{{- $v }}
{{- else if eq $unit "m" }}
{{- mul $v 60 }}
{{- else if eq $unit "h" }}
{{- mul $v 3600 }}
{{- else }}
{{- fail (printf "%q has an unknown unit; use ms, s, m or h" $d) }}
{{- end }}
{{- end }}

{{/* Refuses combinations of values that would deploy something broken. */}}
{{- define "keygate.validate" -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName: a Secret with tls.crt and tls.key" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.enabled) }}
{{- fail "tls.clientCA.enabled (mTLS) needs tls.enabled" }}
{{- end }}
{{- if and (not .Values.database.existingSecret) (not .Values.database.url) }}
{{- fail "set database.existingSecret (a Secret with the PostgreSQL URL) or database.url" }}
{{- end }}
{{- if and (not .Values.policy.existingConfigMap) (not (trim (toString .Values.policy.routes))) }}
{{- fail "set policy.routes (the route policy, TOML) or policy.existingConfigMap" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.targetMemoryUtilizationPercentage) }}
{{- fail "autoscaling.enabled needs autoscaling.targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" }}
{{- end }}
{{- $grace := include "keygate.durationSeconds" .Values.keygate.shutdownGrace | atoi }}
{{- $preStop := int (.Values.lifecycle.preStopSleepSeconds | default 0) }}
{{- $termination := int .Values.terminationGracePeriodSeconds }}
{{- if le $termination (add $grace $preStop) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds (%d) + keygate.shutdownGrace (%ds), or Kubernetes kills keygate while calls are still draining" $termination $preStop $grace) }}
{{- end }}
{{- end }}

{{/*
The probe handler: native gRPC health (grpc.health.v1, service ""). With
TLS on the gRPC port, kubelet's gRPC probe (plaintext only) asks keygate's
plaintext health-only port (--health-listen) instead.
*/}}
{{/* Liveness asks keygate's "liveness" health service, which stays SERVING
while the store is down: restarting every replica during a database outage
would only lose their caches. */}}
{{- define "keygate.livenessHandler" -}}
grpc:
  port: {{ include "keygate.probePort" . }}
  service: liveness
{{- end }}

{{- define "keygate.probeHandler" -}}
grpc:
  port: {{ include "keygate.probePort" . }}
{{- end }}

{{/* The port kubelet's gRPC probes use: the gRPC port, or with TLS the
plaintext health-only port. */}}
{{- define "keygate.probePort" -}}
{{- if .Values.tls.enabled }}50052{{ else }}50051{{ end }}
{{- end }}

{{/* KEYGATE_DATABASE_URL from a Secret; never inline. */}}
{{- define "keygate.databaseEnv" -}}
- name: KEYGATE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .secretKey }}
{{- end }}
