{{/*
Names, labels, images and the restricted security context shared by every template.
*/}}

{{- define "iip.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "iip.fullname" -}}
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

{{- define "iip.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. `part-of: iip` is also what operators.orchestration.pod_spec puts on step pods. */}}
{{- define "iip.labels" -}}
helm.sh/chart: {{ include "iip.chart" . }}
{{ include "iip.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: iip
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "iip.selectorLabels" -}}
app.kubernetes.io/name: {{ include "iip.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of step pods, as set by operators.orchestration.pod_spec.pod_labels (NetworkPolicy selector). */}}
{{- define "iip.stepPodSelector" -}}
app.kubernetes.io/part-of: iip
app.kubernetes.io/component: step
{{- end }}

{{- define "iip.vllm.fullname" -}}
{{- printf "%s-vllm" (include "iip.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "iip.vllm.selectorLabels" -}}
{{ include "iip.selectorLabels" . }}
app.kubernetes.io/component: vllm-server
{{- end }}

{{- define "iip.vllm.servedModelName" -}}
{{- default .Values.vllm.model .Values.vllm.servedModelName }}
{{- end }}

{{/* Base URL of the OpenAI-compatible API, as the LLM layer's openai backend expects it. */}}
{{- define "iip.vllm.url" -}}
{{- printf "http://%s.%s.svc:%d/v1" (include "iip.vllm.fullname" .) .Release.Namespace (int .Values.vllm.port) }}
{{- end }}

{{- define "iip.stepServiceAccountName" -}}
{{- .Values.stepServiceAccount.name }}
{{- end }}

{{- define "iip.launcherServiceAccountName" -}}
{{- default (printf "%s-launcher" (include "iip.fullname" .)) .Values.launcher.serviceAccount.name }}
{{- end }}

{{- define "iip.airflowNamespace" -}}
{{- default .Release.Namespace .Values.airflow.namespace }}
{{- end }}

{{/*
An image reference from {registry, repository, tag, digest}; the tag defaults to appVersion.
Usage: include "iip.imageRef" (dict "root" $ "image" .Values.images.cpu)
*/}}
{{- define "iip.imageRef" -}}
{{- $root := .root }}
{{- $img := .image }}
{{- if not $img.repository }}
{{- fail "an image needs a repository" }}
{{- end }}
{{- $repo := $img.repository }}
{{- if $root.Values.images.registry }}
{{- $repo = printf "%s/%s" (trimSuffix "/" $root.Values.images.registry) $img.repository }}
{{- end }}
{{- $tag := default $root.Chart.AppVersion $img.tag | toString }}
{{- if eq $tag "latest" }}
{{- fail (printf "image %s: pin a version tag or digest, not 'latest'" $repo) }}
{{- end }}
{{- if $img.digest }}
{{- printf "%s:%s@%s" $repo $tag $img.digest }}
{{- else }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}
{{- end }}

{{/* The image of one kind: cpu, vllm or train. Usage: include "iip.image" (dict "root" $ "kind" "cpu") */}}
{{- define "iip.image" -}}
{{- $img := get .root.Values.images .kind }}
{{- if not (and $img (kindIs "map" $img)) }}
{{- fail (printf "unknown image kind %q: use one of cpu, vllm, train" .kind) }}
{{- end }}
{{- include "iip.imageRef" (dict "root" .root "image" $img) }}
{{- end }}

{{- define "iip.vllm.image" -}}
{{- if .Values.vllm.image.repository }}
{{- include "iip.imageRef" (dict "root" . "image" .Values.vllm.image) }}
{{- else }}
{{- include "iip.image" (dict "root" . "kind" "vllm") }}
{{- end }}
{{- end }}

{{/* The same secret-looking-name rule as operators.orchestration.pod_spec.SECRETISH. */}}
{{- define "iip.secretishPattern" -}}
(?i)(SECRET|PASSWORD|TOKEN|PRIVATE|CREDENTIAL|API_?KEY|ACCESS_KEY)
{{- end }}

{{/*
Fail when a non-secret env map or list gives a credential-looking name a literal value.
Usage: include "iip.assertNoSecretLiterals" (dict "root" $ "where" "profiles.cpu.env" "env" .env)
*/}}
{{- define "iip.assertNoSecretLiterals" -}}
{{- $pattern := include "iip.secretishPattern" .root }}
{{- if kindIs "map" .env }}
{{- range $name, $_ := .env }}
{{- if regexMatch $pattern $name }}
{{- fail (printf "%s.%s looks like a secret: reference an existing Secret instead of a literal value" $.where $name) }}
{{- end }}
{{- end }}
{{- else }}
{{- range .env }}
{{- if and (regexMatch $pattern (toString .name)) (hasKey . "value") }}
{{- fail (printf "%s: %s looks like a secret: use valueFrom.secretKeyRef, never a literal value" $.where .name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pod-level security context: non-root, RuntimeDefault seccomp. */}}
{{- define "iip.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .Values.podSecurity.runAsUser }}
runAsGroup: {{ int .Values.podSecurity.runAsGroup }}
fsGroup: {{ int .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level restricted security context (Pod Security Standard "restricted"). */}}
{{- define "iip.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .Values.podSecurity.runAsUser }}
runAsGroup: {{ int .Values.podSecurity.runAsGroup }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The S3 credentials as Secret references (the shape of pod_spec.SecretEnv). */}}
{{- define "iip.s3SecretEnv" -}}
- env: AWS_ACCESS_KEY_ID
  secret: {{ .Values.s3.existingSecret }}
  key: {{ .Values.s3.accessKeyIdKey }}
- env: AWS_SECRET_ACCESS_KEY
  secret: {{ .Values.s3.existingSecret }}
  key: {{ .Values.s3.secretAccessKeyKey }}
{{- end }}

{{/* Non-secret environment shared by step pods (from values; the profiles' own env merges over it). */}}
{{- define "iip.stepEnv" -}}
IIP_DATA_ROOT: {{ .Values.platform.dataRoot | quote }}
IIP_LOG_LEVEL: {{ .Values.platform.logLevel | quote }}
{{- with .Values.s3.endpointUrl }}
S3_ENDPOINT_URL: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
AWS_DEFAULT_REGION: {{ . | quote }}
{{- end }}
{{- if .Values.vllm.enabled }}
IIP_VLLM_BASE_URL: {{ include "iip.vllm.url" . | quote }}
IIP_VLLM_MODEL: {{ include "iip.vllm.servedModelName" . | quote }}
{{- end }}
{{- end }}

{{/*
IIP_POD_PROFILES: a JSON object of pod_spec.PodProfile, one per values.profiles entry (only the fields
PodProfile accepts: it forbids extra keys).
*/}}
{{- define "iip.podProfiles" -}}
{{- $root := . }}
{{- $out := dict }}
{{- range $name, $p := .Values.profiles }}
{{- include "iip.assertNoSecretLiterals" (dict "root" $root "where" (printf "profiles.%s.env" $name) "env" ($p.env | default dict)) }}
{{- $gpus := int ($p.gpus | default 0) }}
{{- $secretEnv := include "iip.s3SecretEnv" $root | fromYamlArray }}
{{- if and (gt $gpus 0) $root.Values.huggingface.existingSecret }}
{{- $secretEnv = append $secretEnv (dict "env" "HF_TOKEN" "secret" $root.Values.huggingface.existingSecret "key" $root.Values.huggingface.tokenKey) }}
{{- end }}
{{- $env := merge (deepCopy ($p.env | default dict)) (include "iip.stepEnv" $root | fromYaml) }}
{{- $profile := dict
  "image" (include "iip.image" (dict "root" $root "kind" ($p.image | default $name)))
  "namespace" $root.Release.Namespace
  "service_account" (include "iip.stepServiceAccountName" $root)
  "cpu" (toString $p.cpu)
  "memory" (toString $p.memory)
  "gpus" $gpus
  "secret_env" $secretEnv
  "env" $env
  "image_pull_policy" $root.Values.images.pullPolicy
  "deferrable" (default false $p.deferrable)
}}
{{- with $p.cpuLimit }}{{- $_ := set $profile "cpu_limit" (toString .) }}{{- end }}
{{- with $p.memoryLimit }}{{- $_ := set $profile "memory_limit" (toString .) }}{{- end }}
{{- with $p.startupTimeoutSeconds }}{{- $_ := set $profile "startup_timeout_seconds" (int .) }}{{- end }}
{{- if gt $gpus 0 }}
{{- $_ := set $profile "node_selector" (default dict $root.Values.gpu.nodeSelector) }}
{{- $tols := list }}
{{- range $root.Values.gpu.tolerations }}
{{- $t := dict "key" .key "operator" (default "Equal" .operator) }}
{{- with .value }}{{- $_ := set $t "value" . }}{{- end }}
{{- with .effect }}{{- $_ := set $t "effect" . }}{{- end }}
{{- $tols = append $tols $t }}
{{- end }}
{{- $_ := set $profile "tolerations" $tols }}
{{- end }}
{{- $_ := set $out $name $profile }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* Checks run once per render: values that can't work fail early with a message naming the field. */}}
{{- define "iip.validate" -}}
{{- if not (hasPrefix "s3://" .Values.platform.dataRoot) }}
{{- fail (printf "platform.dataRoot must be an s3:// URI (step pods share no filesystem), got %q" .Values.platform.dataRoot) }}
{{- end }}
{{- if not .Values.s3.existingSecret }}
{{- fail "s3.existingSecret must name the Secret that holds the S3 credentials" }}
{{- end }}
{{- if lt (int .Values.podSecurity.runAsUser) 1 }}
{{- fail "podSecurity.runAsUser must be a non-root uid" }}
{{- end }}
{{- end }}
