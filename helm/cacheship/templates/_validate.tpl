{{/*
Rules that span several values (values.schema.json checks each value on its own). A broken
rule stops the install with a message instead of deploying workers that misbehave later.
*/}}
{{- define "cacheship.validate" -}}
{{- $w := .Values.worker }}

{{- /* The soft limit must come first so a task can clean up before it is killed. */}}
{{- if ge (int $w.taskSoftTimeLimit) (int $w.taskTimeLimit) }}
{{- fail (printf "worker.taskSoftTimeLimit (%d) must be below worker.taskTimeLimit (%d)" (int $w.taskSoftTimeLimit) (int $w.taskTimeLimit)) }}
{{- end }}

{{- /* Workers renew the lease on every message they hold each sixth of the timeout: below a
minute, a short stall of a healthy worker (GC, a Redis fail-over) would hand its tasks out twice. */}}
{{- if lt (int $w.visibilityTimeout) 30 }}
{{- fail (printf "worker.visibilityTimeout (%d) must be at least 30 seconds: workers renew their leases every sixth of it" (int $w.visibilityTimeout)) }}
{{- end }}

{{- /* A warm shutdown waits for running tasks; a shorter grace period kills them. */}}
{{- $grace := int (include "cacheship.worker.gracePeriod" .) }}
{{- if and (lt $grace (int $w.taskTimeLimit)) (not $w.allowTaskInterruption) }}
{{- fail (printf "worker.terminationGracePeriodSeconds (%d) is below worker.taskTimeLimit (%d): rollouts would kill running tasks. Raise it, or set worker.allowTaskInterruption=true to accept that (see values.yaml)" $grace (int $w.taskTimeLimit)) }}
{{- end }}

{{- if and .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}
{{- fail "autoscaling.hpa and autoscaling.keda cannot both be enabled: KEDA creates its own HPA for the workers" }}
{{- end }}

{{- if and .Values.autoscaling.keda.enabled (not .Values.redis.internal.enabled) (not .Values.autoscaling.keda.redis.address) }}
{{- fail "autoscaling.keda.redis.address (host:port of the external Redis) is required when autoscaling.keda is enabled" }}
{{- end }}

{{- $kp := .Values.autoscaling.keda.redis.passwordSecret }}
{{- if and .Values.autoscaling.keda.enabled (not .Values.redis.internal.enabled) (ne (empty $kp.name) (empty $kp.key)) }}
{{- fail "autoscaling.keda.redis.passwordSecret needs both name and key (or neither)" }}
{{- end }}

{{- $c := .Values.s3.credentials }}
{{- if and (eq $c.source "irsa") (not $c.irsaRoleArn) }}
{{- fail "s3.credentials.irsaRoleArn is required when s3.credentials.source is irsa" }}
{{- end }}
{{- if and (eq $c.source "irsa") (not .Values.serviceAccount.create) }}
{{- fail "s3.credentials.source=irsa annotates the chart's ServiceAccount: serviceAccount.create must be true (or annotate your own and use source=none)" }}
{{- end }}

{{- if and .Values.flower.enabled .Values.flower.auth.enabled (not .Values.flower.auth.existingSecret) (not .Values.flower.auth.username) }}
{{- fail "flower.auth.username is required when the chart creates Flower's auth Secret" }}
{{- end }}
{{- end }}
