{{/* Names */}}
{{- define "kvtier.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kvtier.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kvtier.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: engine
{{- end -}}

{{- define "kvtier.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{/* A setting of `kvtier:` as a float (0 when unset). */}}
{{- define "kvtier.num" -}}
{{- $v := index .root.Values.kvtier .key | default 0 -}}
{{- $f := float64 $v -}}
{{- if lt $f 0.0 -}}
{{- fail (printf "kvtier.%s=%v is not allowed: use a size >= 0" .key $v) -}}
{{- end -}}
{{- $f -}}
{{- end -}}

{{- define "kvtier.hasDisk" -}}
{{- $gb := include "kvtier.num" (dict "root" . "key" "disk_cache_gb") | float64 -}}
{{- $blocks := include "kvtier.num" (dict "root" . "key" "disk_cache_blocks") | float64 -}}
{{- if or (gt $gb 0.0) (gt $blocks 0.0) -}}true{{- end -}}
{{- end -}}

{{/* The disk volume's size in Gi (an integer string): disk_cache_gb plus overhead, or disk.sizeGi. */}}
{{- define "kvtier.diskGi" -}}
{{- if .Values.disk.sizeGi -}}
{{- .Values.disk.sizeGi | int -}}
{{- else -}}
{{- $gb := include "kvtier.num" (dict "root" . "key" "disk_cache_gb") | float64 -}}
{{- if not (gt $gb 0.0) -}}
{{- fail "disk_cache_blocks sizes the disk tier in blocks: set disk.sizeGi to the volume size in Gi" -}}
{{- end -}}
{{- $pct := .Values.disk.overheadPercent | float64 -}}
{{- if lt $pct 0.0 -}}{{- fail (printf "disk.overheadPercent=%v is not allowed: use a percentage >= 0" .Values.disk.overheadPercent) -}}{{- end -}}
{{- ceil (mulf $gb (addf 1.0 (divf $pct 100.0))) | int -}}
{{- end -}}
{{- end -}}

{{/* Pod memory (request = limit) in Gi: base + host tier + shm. */}}
{{- define "kvtier.memoryGi" -}}
{{- $base := .Values.memory.baseGi | float64 -}}
{{- if lt $base 0.0 -}}{{- fail (printf "memory.baseGi=%v is not allowed: use a size >= 0" .Values.memory.baseGi) -}}{{- end -}}
{{- $host := include "kvtier.num" (dict "root" . "key" "host_cache_gb") | float64 -}}
{{- $blocks := include "kvtier.num" (dict "root" . "key" "host_cache_blocks") | float64 -}}
{{- if and (gt $blocks 0.0) (not .Values.memory.limitOverride) -}}
{{- fail "host_cache_blocks sizes the host tier in blocks, which the chart cannot turn into memory: set kvtier.host_cache_gb, or memory.requestOverride and memory.limitOverride" -}}
{{- end -}}
{{- $shm := 0.0 -}}
{{- if .Values.shm.enabled -}}{{- $shm = .Values.shm.sizeGi | float64 -}}{{- end -}}
{{- ceil (addf $base $host $shm) | int -}}
{{- end -}}

{{/* The shared tier's URL ("" for none). */}}
{{- define "kvtier.remoteUrl" -}}
{{- $name := include "kvtier.fullname" . -}}
{{- $t := .Values.shared.type -}}
{{- if eq $t "none" -}}
{{- else if eq $t "redis" -}}
{{- printf "redis://%s-redis:%d/%d" $name (.Values.shared.redis.port | int) (.Values.shared.redis.db | int) -}}
{{- else if eq $t "redisCluster" -}}
{{- $c := .Values.shared.redisCluster -}}
{{- $nodes := list -}}
{{- range $i := until ($c.masters | int) -}}
{{- $nodes = append $nodes (printf "%s-redis-cluster-%d.%s-redis-cluster:%d" $name $i $name ($c.port | int)) -}}
{{- end -}}
{{- printf "redis+cluster://%s/" (join "," $nodes) -}}
{{- else if eq $t "mooncake" -}}
{{- $m := .Values.shared.mooncake -}}
{{- printf "mooncake://%s-mooncake:%d?metadata=http://%s-mooncake:%d/metadata&protocol=%s" $name ($m.rpcPort | int) $name ($m.metadataPort | int) $m.protocol -}}
{{- else if eq $t "s3" -}}
{{- $u := required "shared.s3.url is required with shared.type=s3 (s3://bucket/prefix?endpoint=http://host:port)" .Values.shared.s3.url -}}
{{- if not (hasPrefix "s3://" $u) -}}{{- fail (printf "shared.s3.url=%q is not allowed: use s3://bucket/prefix[?endpoint=http://host:port]" $u) -}}{{- end -}}
{{- $u -}}
{{- else if eq $t "external" -}}
{{- required "shared.external.url is required with shared.type=external" .Values.shared.external.url -}}
{{- else -}}
{{- fail (printf "shared.type=%q is not allowed: use none, redis, redisCluster, mooncake, s3 or external" $t) -}}
{{- end -}}
{{- end -}}

{{/* --kv-transfer-config as JSON. */}}
{{- define "kvtier.transferConfig" -}}
{{- $extra := deepCopy (.Values.kvtier | default dict) -}}
{{- if include "kvtier.hasDisk" . -}}
{{- $_ := set $extra "disk_dir" .Values.disk.mountPath -}}
{{- end -}}
{{- $url := include "kvtier.remoteUrl" . -}}
{{- if $url -}}
{{- $_ := set $extra "remote_url" $url -}}
{{- end -}}
{{- $cfg := dict "kv_connector" "KvtierConnector" "kv_connector_module_path" "kvtier.connectors.vllm" "kv_role" "kv_both" "kv_connector_extra_config" $extra -}}
{{- toJson $cfg -}}
{{- end -}}

{{- define "kvtier.metricsPort" -}}
{{- $p := .Values.kvtier.metrics_port | default 0 | int -}}
{{- if or (lt $p 0) (gt $p 65535) -}}{{- fail (printf "kvtier.metrics_port=%d is not allowed: use 0 (off) or 1-65535" $p) -}}{{- end -}}
{{- if eq $p (.Values.port | int) -}}{{- fail (printf "kvtier.metrics_port=%d is the server's port: use another" $p) -}}{{- end -}}
{{- if gt $p 0 -}}{{- $p -}}{{- end -}}
{{- end -}}

{{/* Checks that stop rendering with a message. */}}
{{- define "kvtier.validate" -}}
{{- if not (has .Values.workload (list "Deployment" "StatefulSet")) -}}
{{- fail (printf "workload=%q is not allowed: use Deployment or StatefulSet" .Values.workload) -}}
{{- end -}}
{{- if include "kvtier.hasDisk" . -}}
{{- if not (has .Values.disk.type (list "emptyDir" "pvc" "hostPath")) -}}
{{- fail (printf "disk.type=%q is not allowed: the disk tier needs a real volume (O_DIRECT fails on the container's overlayfs and tmpfs): use emptyDir, pvc or hostPath" .Values.disk.type) -}}
{{- end -}}
{{- if and (eq .Values.disk.type "pvc") (ne .Values.workload "StatefulSet") -}}
{{- fail "disk.type=pvc needs workload=StatefulSet: one volume per pod (kvtier runs one engine per disk_dir)" -}}
{{- end -}}
{{- if not (hasPrefix "/" .Values.disk.mountPath) -}}
{{- fail (printf "disk.mountPath=%q is not allowed: use an absolute path" .Values.disk.mountPath) -}}
{{- end -}}
{{- end -}}
{{- if lt (.Values.replicas | int) 0 -}}{{- fail "replicas must be >= 0" -}}{{- end -}}
{{- if eq .Values.shared.type "redisCluster" -}}
{{- if lt (.Values.shared.redisCluster.masters | int) 3 -}}
{{- fail (printf "shared.redisCluster.masters=%v is not allowed: Redis Cluster needs at least 3 masters" .Values.shared.redisCluster.masters) -}}
{{- end -}}
{{- end -}}
{{- end -}}
