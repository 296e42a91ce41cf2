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
where camelCase values become the config's snake_case keys (engine.maxNumSeqs ->
engine.max_num_seqs, engine.vllm.tensorParallelSize -> engine.vllm.tensor_parallel_size,
serving.router.*, serving.autoscaling.*, parallel.*). The RayService's serveConfigV2 passes it as
the application's args and the front door reads it from a ConfigMap, so both run one
configuration, validated by the same code (tests/helm/test_helm_serve_config.py loads every preset).
*/}}
{{- define "gptoss-cluster.clusterConfig" -}}
{{- $v := .Values -}}
{{- $model := dict "path" $v.model.path "preset" "" "name" $v.model.name "dtype" $v.model.dtype "hugepage_weights" $v.model.hugepageWeights -}}
{{- $e := $v.engine -}}
{{- $vl := $e.vllm -}}
{{- $vllm := dict "tensor_parallel_size" (int $vl.tensorParallelSize) "data_parallel_size" (int $vl.dataParallelSize) "enable_expert_parallel" $vl.enableExpertParallel "gpu_memory_utilization" $vl.gpuMemoryUtilization "max_model_len" (int $vl.maxModelLen) "max_num_seqs" (int $vl.maxNumSeqs) "max_num_batched_tokens" (int $vl.maxNumBatchedTokens) "async_scheduling" $vl.asyncScheduling "enforce_eager" $vl.enforceEager "distributed_executor_backend" $vl.distributedExecutorBackend "structured_outputs" $vl.structuredOutputs -}}
{{- $engine := dict "kind" $e.kind "max_num_seqs" (int $e.maxNumSeqs) "max_num_batched_tokens" (int $e.maxNumBatchedTokens) "max_waiting_requests" (int $e.maxWaitingRequests) "block_size" (int $e.blockSize) "kv_cache_memory_mib" $e.kvCacheMemoryMib "enable_prefix_caching" $e.enablePrefixCaching "default_max_tokens" (int $e.defaultMaxTokens) "chunk_interval_ms" $e.chunkIntervalMs "torch_threads" (int $e.torchThreads) "vllm" $vllm -}}
{{- $_ := set $vllm "structured_outputs" $vl.structuredOutputs -}}
{{- $_ := set $engine "structured_wrap_up_tokens" (int $e.structuredWrapUpTokens) -}}
{{- $r := $v.serving.router -}}
{{- $router := dict "policy" $r.policy "load_bound_ratio" $r.loadBoundRatio "load_bound_slack" $r.loadBoundSlack "kv_weight" $r.kvWeight "block_size" (int $r.blockSize) "prefix_blocks_per_replica" (int $r.prefixBlocksPerReplica) "stats_period_s" $r.statsPeriodS -}}
{{- $a := $v.serving.autoscaling -}}
{{- $autoscaling := dict "enabled" $a.enabled "min_replicas" (int $a.minReplicas) "max_replicas" (int $a.maxReplicas) "target_ongoing_per_replica" $a.targetOngoingPerReplica "target_kv_use" $a.targetKvUse "upscale_delay_s" $a.upscaleDelayS "downscale_delay_s" $a.downscaleDelayS "look_back_period_s" $a.lookBackPeriodS "metrics_interval_s" $a.metricsIntervalS -}}
{{- $serving := dict "app_name" $v.serving.appName "replicas" (int $v.serving.replicas) "num_cpus" $v.serving.numCpus "num_gpus" $v.serving.numGpus "max_ongoing_requests" (int $v.serving.maxOngoingRequests) "max_queued_requests" (int $v.serving.maxQueuedRequests) "graceful_shutdown_timeout_s" $v.serving.gracefulShutdownTimeoutS "max_replicas_per_node" (int $v.serving.maxReplicasPerNode) "user_code_on_main_loop" $v.serving.userCodeOnMainLoop "direct_stream" $v.serving.directStream "replica_stream" $v.serving.replicaStream "direct_stream_tls" $v.serving.directStreamTls.enabled "direct_stream_server_name" $v.serving.directStreamTls.serverName "router" $router "autoscaling" $autoscaling -}}
{{- if $v.serving.directStreamTls.existingSecret }}
{{- $_ := set $serving "direct_stream_cert_file" "/etc/gptoss/direct-stream-tls/tls.crt" }}{{ $_ := set $serving "direct_stream_key_file" "/etc/gptoss/direct-stream-tls/tls.key" }}{{ $_ := set $serving "direct_stream_ca_file" "/etc/gptoss/direct-stream-tls/ca.crt" }}
{{- end -}}
{{- $p := $v.parallel -}}
{{- $parallel := dict "ep_size" (int $p.epSize) "placement_strategy" $p.placementStrategy "placement_policy" $p.placementPolicy "rebalance_interval_s" $p.rebalanceIntervalS "redundant_experts" (int $p.redundantExperts) "expert_token_series" $p.expertTokenSeries "stats_window_steps" (int $p.statsWindowSteps) "bundle_cpus" $p.bundleCpus "collective_timeout_s" $p.collectiveTimeoutS -}}
{{- $fa := $v.frontdoor.auth -}}
{{- $admins := $fa.adminTenants -}}
{{- if and (not $fa.existingSecret) (not $fa.allowUnauthenticated) }}{{ $admins = join "," (compact (list $fa.adminTenants "admin")) }}{{ end -}}
{{- $auth := dict "admin_tenants" $admins "allow_unauthenticated" $fa.allowUnauthenticated "loopback_admin" $fa.loopbackAdmin "reload_interval_s" $fa.reloadIntervalS -}}
{{- if include "gptoss-cluster.apiKeysSecret" . }}{{ $_ := set $auth "api_keys_file" "/etc/gptoss/api-keys" }}{{ end -}}
{{- $tls := dict -}}
{{- if $v.frontdoor.tls.existingSecret }}
{{- $_ := set $tls "cert_file" "/etc/gptoss/tls/tls.crt" }}{{ $_ := set $tls "key_file" "/etc/gptoss/tls/tls.key" }}
{{- if $v.frontdoor.tls.clientCa }}{{ $_ := set $tls "client_ca_file" "/etc/gptoss/tls/ca.crt" }}{{ end }}
{{- end -}}
{{- $l := $v.frontdoor.limits -}}
{{- $limits := dict "requests_per_s" $l.requestsPerS "request_burst" $l.requestBurst "tokens_per_s" $l.tokensPerS "token_burst" $l.tokenBurst "tokens_per_min" $l.tokensPerMin "max_concurrent_streams" (int $l.maxConcurrentStreams) "max_context_tokens" (int $l.maxContextTokens) "max_output_tokens" (int $l.maxOutputTokens) -}}
{{- if $v.frontdoor.tenants }}{{ $_ := set $limits "tenants_file" "/etc/gptoss/config/tenants.yaml" }}{{ end -}}
{{- $frontdoor := dict "host" "0.0.0.0" "grpc_port" $v.frontdoor.grpcPort "metrics_port" $v.frontdoor.metricsPort "grace_period_s" $v.frontdoor.gracePeriodS "max_concurrent_rpcs" $v.frontdoor.maxConcurrentRpcs "replica_wait_s" $v.frontdoor.replicaWaitS "migration_attempts" (int $v.frontdoor.migrationAttempts) "load_poll_interval_s" $v.frontdoor.loadPollIntervalS "slow_first_token_s" $v.frontdoor.slowFirstTokenS "usage_log" $v.frontdoor.usageLog "auth" $auth "limits" $limits -}}
{{- if $tls }}{{ $_ := set $frontdoor "tls" $tls }}{{ end -}}
{{- $_ := set $frontdoor "http_port" (ternary (int $v.frontdoor.http.port) -1 $v.frontdoor.http.enabled) -}}
{{- $r := $v.frontdoor.responses -}}
{{- $responses := dict "kind" (ternary "redis" $r.store $r.redis.bundled.enabled) "ttl_s" $r.ttlS "max_response_bytes" (int $r.maxResponseBytes) "max_entries" (int $r.maxEntries) -}}
{{- if $r.redis.bundled.enabled }}{{ $_ := set $responses "redis_url" (printf "redis://%s-redis:6379/0" (include "gptoss-cluster.fullname" $)) }}
{{- else if and $r.redis.url (not $r.redis.existingSecret) }}{{ $_ := set $responses "redis_url" $r.redis.url }}{{ end -}}
{{- $_ := set $frontdoor "responses" $responses -}}
{{- $config := dict "model" $model "engine" $engine "serving" $serving "parallel" $parallel "frontdoor" $frontdoor "log_level" $v.logLevel "cache_dir" "/tmp/gptoss-cache" -}}
{{- toYaml $config }}
{{- end }}

{{/*
gptoss-cluster.apiKeysSecret: the Secret of the front door's API keys (mounted as a directory: each
key of the Secret is a tenant, its value that tenant's key): frontdoor.auth.existingSecret, else the
one the chart generates (secret-api-keys.yaml), else "" when frontdoor.auth.allowUnauthenticated.
*/}}
{{- define "gptoss-cluster.apiKeysSecret" -}}
{{- if .Values.frontdoor.auth.existingSecret }}{{ .Values.frontdoor.auth.existingSecret }}
{{- else if not .Values.frontdoor.auth.allowUnauthenticated }}{{ include "gptoss-cluster.fullname" . }}-api-keys
{{- end }}
{{- end }}

{{/*
gptoss-cluster.rayAuthSecret: the Secret holding Ray's auth token under the key `auth_token` (KubeRay's
convention): ray.auth.existingSecret, else the one the chart generates (secret-ray-auth.yaml).
*/}}
{{- define "gptoss-cluster.rayAuthSecret" -}}
{{- default (printf "%s-ray-auth" (include "gptoss-cluster.fullname" .)) .Values.ray.auth.existingSecret }}
{{- end }}

{{/*
gptoss-cluster.rayAuthEnv: the environment that turns on Ray's token authentication in a container
(Ray >= 2.52): every Ray process of the pod (raylet, GCS, dashboard, workers, `ray` CLI, ray.init)
then sends and requires the token. KubeRay injects the same for its own pods from authOptions; it
is set here too so the front door pods, which join with `ray start`, and exec'd CLIs match.
*/}}
{{- define "gptoss-cluster.rayAuthEnv" -}}
- {name: RAY_AUTH_MODE, value: token}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "gptoss-cluster.rayAuthSecret" . }}
      key: auth_token
{{- end }}

{{/*
gptoss-cluster.rayWorkerEnv: the environment of the Ray head and worker containers that sets the
priority of Ray's worker processes (replicas and the engine processes they start), ray.workerNiceness;
Ray's default, 15, would run the engine below the daemons and serving path sharing its cores.
*/}}
{{- define "gptoss-cluster.rayWorkerEnv" -}}
- {name: RAY_worker_niceness, value: {{ .Values.ray.workerNiceness | int | quote }}}
{{- end }}

{{/*
gptoss-cluster.gcsReconnectEnv (with ray.gcsFaultTolerance on): how long the Ray processes of a worker or
front door pod wait for a restarting GCS before they exit (KubeRay sets its own default on its worker
pods only; the front door pods join with `ray start` and would otherwise give up after Ray's 60 s).
*/}}
{{- define "gptoss-cluster.gcsReconnectEnv" -}}
- {name: RAY_gcs_rpc_server_reconnect_timeout_s, value: {{ .Values.ray.gcsFaultTolerance.reconnectTimeoutS | int | quote }}}
{{- end }}

{{/*
gptoss-cluster.releasePods: a NetworkPolicy peer matching this release's Ray pods and front doors.
*/}}
{{- define "gptoss-cluster.releasePods" -}}
- podSelector:
    matchExpressions:
      - {key: app.kubernetes.io/instance, operator: In, values: [{{ .Release.Name | quote }}]}
      - {key: app.kubernetes.io/name, operator: In, values: [{{ include "gptoss-cluster.name" . | quote }}]}
      - {key: app.kubernetes.io/component, operator: In, values: [ray-head, ray-worker, frontdoor]}
{{- end }}

{{/*
gptoss-cluster.tenantsFile: frontdoor.tenants as the tenants file of cluster/frontdoor/tenants.py
(camelCase settings -> snake_case).
*/}}
{{- define "gptoss-cluster.tenantsFile" -}}
{{- $names := dict "role" "role" "requestsPerS" "requests_per_s" "requestBurst" "request_burst" "tokensPerMin" "tokens_per_min" "tokenBurst" "token_burst" "maxConcurrentStreams" "max_concurrent_streams" "maxContextTokens" "max_context_tokens" "maxOutputTokens" "max_output_tokens" -}}
{{- $tenants := dict -}}
{{- range $tenant, $settings := .Values.frontdoor.tenants }}
{{- $entry := dict -}}
{{- range $key, $value := $settings }}{{ $_ := set $entry (index $names $key) $value }}{{ end -}}
{{- $_ := set $tenants $tenant $entry -}}
{{- end -}}
{{- toYaml (dict "tenants" $tenants) }}
{{- end }}

{{/*
gptoss-cluster.serveConfig: the Serve config file (KubeRay serveConfigV2). One application, our
builder (cluster.serving.builder:app_builder) with the ClusterConfig as args; route_prefix null
because clients come through the gRPC front door, not Serve's HTTP proxy (which runs on every
node only so KubeRay's worker readiness probe finds it). No `deployments` overrides: the builder
sets the ModelReplica's replicas, placement, request router and, with serving.autoscaling on, its
AutoscalingConfig (the engine-signal policy of cluster/serving/autoscaling.py) from the args.
*/}}
{{- define "gptoss-cluster.serveConfig" -}}
{{- $app := dict "name" .Values.serving.appName "import_path" "cluster.serving.builder:app_builder" "route_prefix" nil "args" (include "gptoss-cluster.clusterConfig" . | fromYaml) -}}
{{- $serve := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" 8000) "applications" (list $app) -}}
{{- toYaml $serve }}
{{- end }}

{{/*
gptoss-cluster.removedValues: values this chart no longer reads fail the render with the
name of their replacement, instead of being silently ignored. Also refuses GPU layouts that
cannot be placed: the GPUs one replica reserves (cluster/serving/builder.py) must fit one worker pod.
*/}}
{{- define "gptoss-cluster.removedValues" -}}
{{- $removed := dict "replicaCount" "serving.replicas (model replicas) or frontdoor.replicas (front door pods)" "modelPath" "model.path" "gpusPerReplica" "serving.numGpus" "epSize" "parallel.epSize" "router" "serving.router (serving.router.policy)" -}}
{{- range $key, $hint := $removed }}
{{- if hasKey $.Values $key }}
{{- fail (printf "value %q was removed: use %s" $key $hint) }}
{{- end }}
{{- end }}
{{- $nested := list
  (list .Values.frontdoor "tlsSecret" "frontdoor.tlsSecret" "frontdoor.tls.existingSecret")
  (list .Values.engine "maxActiveRequests" "engine.maxActiveRequests" "engine.maxNumSeqs (the batch) and engine.maxWaitingRequests (the engine's queue)")
  (list .Values.engine "epSize" "engine.epSize" "parallel.epSize")
  (list .Values.serving.autoscaling "targetOngoingRequests" "serving.autoscaling.targetOngoingRequests" "serving.autoscaling.targetOngoingPerReplica (and targetKvUse)") -}}
{{- range $nested }}
{{- if hasKey (index . 0) (index . 1) }}
{{- fail (printf "value %q was removed: use %s" (index . 2) (index . 3)) }}
{{- end }}
{{- end }}
{{- $v := .Values -}}
{{- $podGpus := 0 -}}
{{- range $v.ray.workerGroups }}{{ if gt (int .gpus) $podGpus }}{{ $podGpus = int .gpus }}{{ end }}{{ end -}}
{{- if and (eq $v.engine.kind "vllm") (gt (float64 $v.serving.numGpus) 0.0) }}
{{- $world := mul (int $v.engine.vllm.tensorParallelSize) (int $v.engine.vllm.dataParallelSize) -}}
{{- if ne (float64 $v.serving.numGpus) (float64 $world) }}
{{- fail (printf "serving.numGpus (%v) must equal engine.vllm.tensorParallelSize x dataParallelSize (%d): a vllm replica reserves that many GPUs" $v.serving.numGpus $world) }}
{{- end }}
{{- if lt $podGpus $world }}
{{- fail (printf "a vllm replica needs %d GPUs on one node but no ray.workerGroups entry has that many gpus (most: %d)" $world $podGpus) }}
{{- end }}
{{- end }}
{{- if and (eq $v.engine.kind "torch") (gt (int $v.parallel.epSize) 1) (gt (float64 $v.serving.numGpus) 0.0) (eq $v.parallel.placementStrategy "STRICT_PACK") }}
{{- $need := int (ceil (mulf (float64 $v.serving.numGpus) (float64 $v.parallel.epSize))) -}}
{{- if lt $podGpus $need }}
{{- fail (printf "parallel.epSize %d x serving.numGpus %v needs %d GPUs in one pod (STRICT_PACK) but no ray.workerGroups entry has that many gpus (most: %d)" (int $v.parallel.epSize) $v.serving.numGpus $need $podGpus) }}
{{- end }}
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
