{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "cacheship.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or just the release name when it already contains the chart's. */}}
{{- define "cacheship.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of one component's objects: <fullname>-<component>, kept within 63 characters. */}}
{{- define "cacheship.componentName" -}}
{{- printf "%s-%s" (include "cacheship.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-") .component }}
{{- end }}

{{- define "cacheship.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels ----------------------------------------------------------------------------- */}}

{{/* Labels of every object. Call with (dict "root" $ "component" "worker"). */}}
{{- define "cacheship.labels" -}}
helm.sh/chart: {{ include "cacheship.chart" .root }}
{{ include "cacheship.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Values.image.tag | default .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: cacheship
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The labels selectors match on; they never change over a release's life. */}}
{{- define "cacheship.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cacheship.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Shared pieces -------------------------------------------------------------------- */}}

{{- define "cacheship.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cacheship.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cacheship.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* Redis ------------------------------------------------------------------------------ */}}

{{- define "cacheship.redis.internalName" -}}
{{- include "cacheship.componentName" (dict "root" . "component" "redis") }}
{{- end }}

{{/* Secret and key that hold the Redis URL workers and Flower use. */}}
{{- define "cacheship.redis.urlSecretName" -}}
{{- if .Values.redis.internal.enabled }}
{{- include "cacheship.redis.internalName" . }}
{{- else }}
{{- .Values.redis.external.existingSecret | default (include "cacheship.componentName" (dict "root" . "component" "redis")) }}
{{- end }}
{{- end }}

{{- define "cacheship.redis.urlSecretKey" -}}
{{- if .Values.redis.internal.enabled }}redis-url{{ else }}{{ .Values.redis.external.existingSecretKey }}{{ end }}
{{- end }}

{{/* The environment variable every process reads its broker and result backend from. */}}
{{- define "cacheship.redis.env" -}}
- name: CACHESHIP_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "cacheship.redis.urlSecretName" . }}
      key: {{ include "cacheship.redis.urlSecretKey" . }}
{{- end }}

{{/* S3 credentials ------------------------------------------------------------------------ */}}

{{- define "cacheship.s3.secretName" -}}
{{- .Values.s3.credentials.existingSecret | default (include "cacheship.componentName" (dict "root" . "component" "s3")) }}
{{- end }}

{{/* Worker health ------------------------------------------------------------------------- */}}

{{- define "cacheship.heartbeatFile" -}}
{{- printf "%s/%s" (.Values.worker.heartbeat.dir | trimSuffix "/") .Values.worker.heartbeat.fileName }}
{{- end }}

{{/*
A probe command that succeeds when the heartbeat file was touched at most .maxAge seconds ago.
Only sh, stat and date run: a probe every few seconds must stay cheap, so no Python here.
A missing file makes stat fail, and so the probe.
*/}}
{{- define "cacheship.heartbeatProbe" -}}
exec:
  command:
    - /bin/sh
    - -c
    - {{ printf "m=$(stat -c %%Y \"$CACHESHIP_HEARTBEAT_FILE\") || exit 1; [ $(( $(date +%%s) - m )) -le %d ]" (int .maxAge) | quote }}
{{- end }}

{{/*
Seconds Kubernetes gives a worker between SIGTERM and SIGKILL. By default long enough for the
longest task (the hard time limit) plus a margin to report its result and exit.
*/}}
{{- define "cacheship.worker.gracePeriod" -}}
{{- $w := .Values.worker }}
{{- if kindIs "invalid" $w.terminationGracePeriodSeconds }}
{{- add (int $w.taskTimeLimit) (int $w.shutdownGraceMargin) }}
{{- else }}
{{- int $w.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Directories type=local sources may be read from, comma-separated. */}}
{{- define "cacheship.sourceRoots" -}}
{{- $roots := list }}
{{- range .Values.sources.roots }}
{{- $roots = append $roots . }}
{{- end }}
{{- if .Values.sources.sharedVolume.enabled }}
{{- $roots = append $roots .Values.sources.sharedVolume.mountPath }}
{{- end }}
{{- join "," (uniq $roots) }}
{{- end }}

{{/* Flower ---------------------------------------------------------------------------------- */}}

{{- define "cacheship.flower.name" -}}
{{- include "cacheship.componentName" (dict "root" . "component" "flower") }}
{{- end }}

{{- define "cacheship.flower.authSecretName" -}}
{{- .Values.flower.auth.existingSecret | default (include "cacheship.componentName" (dict "root" . "component" "flower-auth")) }}
{{- end }}
