{{/* Names, labels and the pieces every flavour shares. */}}

{{- define "kindling.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kindling.fullname" -}}
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

{{- define "kindling.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kindling.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kindling.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kindling.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kindling.image" -}}
{{- $tag := default .Values.image.variant .Values.image.tag -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end }}

{{/* Capacity: per replica and model, max_sequences run, queue_size wait. */}}
{{- define "kindling.maxSequences" -}}{{ int .Values.engine.maxSequences }}{{- end }}
{{- define "kindling.holdLimit" -}}{{ add (int .Values.engine.maxSequences) (int .Values.engine.queueSize) }}{{- end }}

{{- define "kindling.configMapName" -}}{{ include "kindling.fullname" . }}-config{{- end }}
{{- define "kindling.modelsConfigMapName" -}}{{ include "kindling.fullname" . }}-models{{- end }}

{{- define "kindling.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "kindling.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "kindling.usesDatabaseUrl" -}}
{{- if or .Values.usage.databaseUrl.value .Values.usage.databaseUrl.existingSecret }}true{{ end }}
{{- end }}

{{- define "kindling.databaseUrlSecretName" -}}
{{- default (printf "%s-usage-db" (include "kindling.fullname" .)) .Values.usage.databaseUrl.existingSecret }}
{{- end }}

{{- define "kindling.claimName" -}}
{{- default (printf "%s-store" (include "kindling.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{- define "kindling.gracePeriod" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (int .Values.preStopSleepSeconds) (int .Values.server.shutdownTimeoutSeconds) 10 }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Checks that stop a broken combination at render time. */}}
{{- define "kindling.validate" -}}
{{- if not (has .Values.flavour (list "plain" "knative" "kserve" "keda")) }}
{{- fail (printf "flavour must be one of plain, knative, kserve, keda (got %q)" .Values.flavour) }}
{{- end }}
{{- if not (has .Values.image.variant (list "cpu" "cuda")) }}
{{- fail (printf "image.variant must be cpu or cuda (got %q)" .Values.image.variant) }}
{{- end }}
{{- if and (gt (int .Values.gpu.count) 0) (ne .Values.image.variant "cuda") }}
{{- fail "gpu.count > 0 needs image.variant: cuda (the cpu image serves on the CPU only)" }}
{{- end }}
{{- if and .Values.usage.databaseUrl.value .Values.usage.databaseUrl.existingSecret }}
{{- fail "usage.databaseUrl: set value or existingSecret, not both" }}
{{- end }}
{{- if and (eq .Values.flavour "keda") (eq .Values.keda.source "metrics-api") (not .Values.apiKeys.autoscalerKey) (not .Values.apiKeys.existingSecret) }}
{{- fail "keda.source metrics-api reads /admin/status with a key: set apiKeys.autoscalerKey (or apiKeys.existingSecret holding apiKeys.autoscalerKeyKey)" }}
{{- end }}
{{- if and (eq .Values.flavour "keda") (eq .Values.keda.source "metrics-api") (not .Values.admin.enabled) }}
{{- fail "keda.source metrics-api reads /admin/status: set admin.enabled true" }}
{{- end }}
{{- if and (eq .Values.flavour "keda") (not (has .Values.keda.source (list "prometheus" "metrics-api"))) }}
{{- fail (printf "keda.source must be prometheus or metrics-api (got %q)" .Values.keda.source) }}
{{- end }}
{{- if and (eq .Values.flavour "kserve") (not (has .Values.kserve.runtimeKind (list "ServingRuntime" "ClusterServingRuntime"))) }}
{{- fail "kserve.runtimeKind must be ServingRuntime or ClusterServingRuntime" }}
{{- end }}
{{- if and (eq .Values.flavour "kserve") (eq .Values.kserve.deploymentMode "RawDeployment") (lt (int .Values.kserve.minReplicas) 1) }}
{{- fail "kserve.deploymentMode RawDeployment cannot scale to zero: set kserve.minReplicas to 1 or more" }}
{{- end }}
{{- if and (eq .Values.flavour "knative") .Values.knative.revisionName (not (hasPrefix (printf "%s-" (include "kindling.fullname" .)) .Values.knative.revisionName)) }}
{{- fail (printf "knative.revisionName must start with %s-" (include "kindling.fullname" .)) }}
{{- end }}
{{- end }}

{{/* The Kindling container's environment. Arg: dict "root" . "knative" bool (Knative gates fieldRef) */}}
{{- define "kindling.env" -}}
{{- $ := .root }}
{{- /* No PORT: kindling.toml listens on 0.0.0.0:<server.port>, and Knative reserves PORT. */}}
{{- if not $.Values.insecurePublic }}
- name: KINDLING_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "kindling.apiKeysSecretName" $ }}
      key: {{ $.Values.apiKeys.key }}
{{- end }}
{{- if include "kindling.usesDatabaseUrl" $ }}
- name: KINDLING_USAGE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "kindling.databaseUrlSecretName" $ }}
      key: {{ $.Values.usage.databaseUrl.key }}
{{- end }}
{{- if $.Values.fetchDemo }}
- name: KINDLING_FETCH_DEMO
  value: "1"
{{- end }}
- name: RUST_LOG
  value: {{ $.Values.logLevel | quote }}
{{- if not .knative }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}
{{- if $.Values.hfTokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.hfTokenSecret }}
      key: token
      optional: true
{{- end }}
{{- with $.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Probes. Arg: dict "root" . "port" (port or "" for Knative) "prefix" ("/health" or "/v2/health") */}}
{{- define "kindling.probes" -}}
{{- $ := .root }}
{{- $port := .port }}
{{- $prefix := .prefix }}
{{- range $probe := list (list "startupProbe" "live" $.Values.probes.startup) (list "readinessProbe" "ready" $.Values.probes.readiness) (list "livenessProbe" "live" $.Values.probes.liveness) }}
{{ index $probe 0 }}:
  httpGet:
    path: {{ printf "%s/%s" $prefix (index $probe 1) }}
    {{- if $port }}
    port: {{ $port }}
    {{- end }}
  {{- toYaml (index $probe 2) | nindent 2 }}
{{- end }}
{{- end }}

{{- define "kindling.resources" -}}
{{- $res := deepCopy (default dict .Values.resources) }}
{{- if gt (int .Values.gpu.count) 0 }}
{{- $limits := default dict (get $res "limits") }}
{{- $_ := set $limits .Values.gpu.resource (toString (int .Values.gpu.count)) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{- define "kindling.volumeMounts" -}}
- name: config
  mountPath: /etc/kindling/kindling.toml
  subPath: kindling.toml
  readOnly: true
- name: models
  mountPath: /etc/kindling/models
  readOnly: true
{{- if .Values.auth.keysFile.existingSecret }}
- name: keys
  mountPath: /etc/kindling/keys
  readOnly: true
{{- end }}
- name: store
  mountPath: /models
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "kindling.volumes" -}}
- name: config
  configMap:
    name: {{ include "kindling.configMapName" . }}
- name: models
  configMap:
    name: {{ include "kindling.modelsConfigMapName" . }}
{{- if .Values.auth.keysFile.existingSecret }}
- name: keys
  secret:
    secretName: {{ .Values.auth.keysFile.existingSecret }}
    items:
      - key: {{ .Values.auth.keysFile.key }}
        path: keys.toml
{{- end }}
{{- if .Values.persistence.enabled }}
- name: store
  persistentVolumeClaim:
    claimName: {{ include "kindling.claimName" . }}
{{- else }}
- name: store
  emptyDir:
    sizeLimit: {{ .Values.persistence.emptyDir.sizeLimit }}
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- end }}

{{- define "kindling.podAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.server.port | quote }}
prometheus.io/path: /metrics
checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}
