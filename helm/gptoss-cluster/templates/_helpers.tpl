{{/*
gptoss-cluster.name: the chart name, or nameOverride. Kubernetes names are DNS labels of at
most 63 characters, so every name here is truncated to 63 and stripped of a trailing "-".
*/}}
{{- define "gptoss-cluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
gptoss-cluster.fullname: "<release>-<chart>" (just the release when it already contains the
chart name), or fullnameOverride; truncated to 63 characters for the same reason. Objects
append a suffix ("-frontdoor"); KubeRay appends "-head-svc" to the RayService's name, so keep
releases short enough that those still fit.
*/}}
{{- define "gptoss-cluster.fullname" -}}
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

{{/* gptoss-cluster.chart: "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "gptoss-cluster.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
gptoss-cluster.selectorLabels: the labels that select a component's pods. Selectors are
immutable, so they hold only what never changes across upgrades (no chart version). Call with
(dict "ctx" $ "component" "frontdoor").
*/}}
{{- define "gptoss-cluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gptoss-cluster.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* gptoss-cluster.labels: selector labels plus the descriptive ones, on every object. */}}
{{- define "gptoss-cluster.labels" -}}
helm.sh/chart: {{ include "gptoss-cluster.chart" .ctx }}
{{ include "gptoss-cluster.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: gptoss-cluster
{{- end }}

{{/* gptoss-cluster.image: "<repository>:<tag>", the tag defaulting to "<appVersion>-gpu". */}}
{{- define "gptoss-cluster.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-gpu" .Chart.AppVersion) .Values.image.tag) }}
{{- end }}

{{/* gptoss-cluster.headService: the head Service KubeRay creates for a RayService ("<name>-head-svc"). */}}
{{- define "gptoss-cluster.headService" -}}
{{- printf "%s-head-svc" (include "gptoss-cluster.fullname" .) }}
{{- end }}

{{/*
gptoss-cluster.clusterConfig: the ClusterConfig (cluster/config.py) as YAML — the one place
where camelCase values become the config's snake_case keys. The RayService's serveConfigV2 passes
it as the application's args and the front door reads it from a ConfigMap, so both run one
configuration, validated by the same code. Keys other branches are still adding to
cluster/config.py (parallel.ep_size, router.policy) appear only when set away from their default.
*/}}
{{- define "gptoss-cluster.clusterConfig" -}}
{{- $v := .Values -}}
{{- $model := dict "path" $v.model.path "preset" "" "name" $v.model.name "dtype" $v.model.dtype -}}
{{- $engine := dict "kind" $v.engine.kind "max_active_requests" $v.engine.maxActiveRequests "default_max_tokens" $v.engine.defaultMaxTokens "chunk_interval_ms" $v.engine.chunkIntervalMs "torch_threads" $v.engine.torchThreads -}}
{{- $gpus := $v.serving.numGpus -}}
{{- $serving := dict "app_name" $v.serving.appName "replicas" $v.serving.replicas "num_cpus" $v.serving.numCpus "num_gpus" $gpus "max_ongoing_requests" $v.serving.maxOngoingRequests "max_queued_requests" $v.serving.maxQueuedRequests "graceful_shutdown_timeout_s" $v.serving.gracefulShutdownTimeoutS -}}
{{- $auth := dict "admin_tenants" $v.frontdoor.auth.adminTenants "allow_unauthenticated" $v.frontdoor.auth.allowUnauthenticated -}}
{{- if $v.frontdoor.auth.existingSecret }}{{ $_ := set $auth "api_keys_file" "/etc/gptoss/api-keys" }}{{ end -}}
{{- $tls := dict -}}
{{- if $v.frontdoor.tls.existingSecret }}
{{- $_ := set $tls "cert_file" "/etc/gptoss/tls/tls.crt" }}{{ $_ := set $tls "key_file" "/etc/gptoss/tls/tls.key" }}
{{- if $v.frontdoor.tls.clientCa }}{{ $_ := set $tls "client_ca_file" "/etc/gptoss/tls/ca.crt" }}{{ end }}
{{- end -}}
{{- $limits := dict "requests_per_s" $v.frontdoor.limits.requestsPerS "request_burst" $v.frontdoor.limits.requestBurst "tokens_per_s" $v.frontdoor.limits.tokensPerS "token_burst" $v.frontdoor.limits.tokenBurst -}}
{{- $frontdoor := dict "host" "0.0.0.0" "grpc_port" $v.frontdoor.grpcPort "metrics_port" $v.frontdoor.metricsPort "grace_period_s" $v.frontdoor.gracePeriodS "max_concurrent_rpcs" $v.frontdoor.maxConcurrentRpcs "auth" $auth "limits" $limits -}}
{{- if $tls }}{{ $_ := set $frontdoor "tls" $tls }}{{ end -}}
{{- $config := dict "model" $model "engine" $engine "serving" $serving "frontdoor" $frontdoor "log_level" $v.logLevel "cache_dir" "/tmp/gptoss-cache" -}}
{{- if gt (int $v.engine.epSize) 1 }}{{ $_ := set $config "parallel" (dict "ep_size" (int $v.engine.epSize)) }}{{ end -}}
{{- if $v.router.policy }}{{ $_ := set $config "router" (dict "policy" $v.router.policy) }}{{ end -}}
{{- toYaml $config }}
{{- end }}

{{/*
gptoss-cluster.serveConfig: the Serve config file (KubeRay serveConfigV2). One application, our
builder (cluster.serving.builder:app_builder) with the ClusterConfig as args; route_prefix null
because clients come through the gRPC front door, not Serve's HTTP proxy (which runs on every
node only so KubeRay's worker readiness probe finds it). Serve autoscaling, when on, overrides the
ModelReplica deployment's replica count.
*/}}
{{- define "gptoss-cluster.serveConfig" -}}
{{- $app := dict "name" .Values.serving.appName "import_path" "cluster.serving.builder:app_builder" "route_prefix" nil "args" (include "gptoss-cluster.clusterConfig" . | fromYaml) -}}
{{- with .Values.serving.autoscaling }}
{{- if .enabled }}
{{- $as := dict "min_replicas" .minReplicas "max_replicas" .maxReplicas "initial_replicas" (max .minReplicas $.Values.serving.replicas) "target_ongoing_requests" .targetOngoingRequests "upscale_delay_s" .upscaleDelayS "downscale_delay_s" .downscaleDelayS -}}
{{- $_ := set $app "deployments" (list (dict "name" "ModelReplica" "num_replicas" "auto" "autoscaling_config" $as)) }}
{{- end }}
{{- end -}}
{{- $serve := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" 8000) "applications" (list $app) -}}
{{- toYaml $serve }}
{{- end }}

{{/*
gptoss-cluster.removedValues: values this chart no longer reads fail the render with the
name of their replacement, instead of being silently ignored.
*/}}
{{- define "gptoss-cluster.removedValues" -}}
{{- $removed := dict "replicaCount" "serving.replicas (model replicas) or frontdoor.replicas (front door pods)" "modelPath" "model.path" "gpusPerReplica" "serving.numGpus" "epSize" "engine.epSize" -}}
{{- range $key, $hint := $removed }}
{{- if hasKey $.Values $key }}
{{- fail (printf "value %q was removed: use %s" $key $hint) }}
{{- end }}
{{- end }}
{{- if hasKey .Values.frontdoor "tlsSecret" }}
{{- fail "value \"frontdoor.tlsSecret\" was removed: use frontdoor.tls.existingSecret" }}
{{- end }}
{{- end }}

{{/* gptoss-cluster.weightsVolume: the model weights volume (pvc, hostPath or emptyDir). */}}
{{- define "gptoss-cluster.weightsVolume" -}}
- name: model-weights
{{- with .Values.model.volume }}
{{- if eq .type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .claimName }}
{{- else if eq .type "hostPath" }}
  hostPath:
    path: {{ .hostPath }}
    type: DirectoryOrCreate
{{- else }}
  emptyDir:
    sizeLimit: {{ .sizeLimit }}
{{- end }}
{{- end }}
{{- end }}

{{/*
gptoss-cluster.downloadInit: the init container that fetches the weights into model.path unless
a checkpoint (config.json) is already there. It writes to a temporary directory beside the
target and renames it into place, so a pod never sees half a checkpoint and of two pods racing
on a shared volume the first to finish wins.
*/}}
{{- define "gptoss-cluster.downloadInit" -}}
{{- $d := .Values.model.download -}}
- name: download-weights
  image: {{ include "gptoss-cluster.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["/bin/sh", "-c"]
  args:
    - |
      set -eu
      target={{ .Values.model.path | quote }}
      if [ -f "$target/config.json" ]; then echo "weights already at $target"; exit 0; fi
      tmp="$(dirname "$target")/.partial-$(hostname)"
      rm -rf "$tmp"
      {{- if eq $d.source "hub" }}
      hf download {{ $d.repo | quote }} --revision {{ $d.revision | quote }} --local-dir "$tmp"
      {{- else }}
      gptoss-cluster checkpoint make --preset {{ $d.preset | quote }} --out "$tmp"
      {{- end }}
      mv -T "$tmp" "$target" || { echo "another pod wrote $target first"; rm -rf "$tmp"; }
  {{- if and (eq $d.source "hub") $d.tokenSecret }}
  env:
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $d.tokenSecret }}
          key: HF_TOKEN
  {{- end }}
  resources:
    requests: {cpu: 500m, memory: 1Gi}
    limits: {memory: 4Gi}
  volumeMounts:
    - name: model-weights
      mountPath: {{ .Values.model.volume.mountPath }}
{{- end }}
