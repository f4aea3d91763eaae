{{- define "trailhose.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "trailhose.fullname" -}}
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

{{- define "trailhose.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trailhose.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "trailhose.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "trailhose.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.mode }}-worker
{{- end }}

{{- define "trailhose.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "trailhose.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "trailhose.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "trailhose.geoipDir" -}}/var/lib/trailhose/geoip{{- end }}
{{- define "trailhose.tablesDir" -}}/var/lib/trailhose/tables{{- end }}
{{- define "trailhose.rulesDir" -}}/var/lib/trailhose/rules{{- end }}

{{/*
Where trailhose reads a detect.rules source: a ConfigMap or a volume mounted as a folder per
source (not subPath, so that Kubernetes' updates reach the pod and the rules reload), or a file
or folder in a volume of extraVolumes.
*/}}
{{- define "trailhose.rulePath" -}}
{{- if or .configMap .volume -}}
{{- printf "%s/%s" (include "trailhose.rulesDir" .) .name -}}
{{- else -}}
{{- .path -}}
{{- end -}}
{{- end }}

{{/* The environment variable that carries detect.alerts[i]'s target from its targetSecret. */}}
{{- define "trailhose.alertTargetEnv" -}}
{{- printf "TRAILHOSE_ALERT_%d_TARGET" . -}}
{{- end }}

{{/*
The trailhose container's environment: `env`, and each detect.alerts targetSecret as the
variable its target_env names (a webhook URL is a secret, kept out of the ConfigMap).
*/}}
{{- define "trailhose.env" -}}
{{- $env := list -}}
{{- if (default dict .Values.detect).rules -}}
{{- range $i, $a := (default dict .Values.detect).alerts -}}
{{- with $a.targetSecret -}}
{{- $env = append $env (dict "name" (include "trailhose.alertTargetEnv" $i) "valueFrom" (dict "secretKeyRef" (dict "name" .name "key" .key))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $env = concat $env (default list .Values.env) -}}
{{- if $env -}}
{{- toYaml $env -}}
{{- end -}}
{{- end }}

{{/*
Fails when the pods would each count correlations alone without the user saying so: with
mode in_process, every pod counts only the events it is given.
*/}}
{{- define "trailhose.checkCorrelation" -}}
{{- $d := default dict .Values.detect -}}
{{- $c := default dict $d.correlation -}}
{{- if and (hasKey $c "acknowledgePerPodCounts") (not (kindIs "bool" $c.acknowledgePerPodCounts)) -}}
{{- fail "detect.correlation.acknowledgePerPodCounts must be true or false (a YAML boolean, not a string)" -}}
{{- end -}}
{{- if and $d.rules (eq (default "in_process" $c.mode) "in_process") (not $c.acknowledgePerPodCounts) -}}
{{- $many := "" -}}
{{- if .Values.keda.enabled -}}
{{- if gt (int .Values.keda.maxReplicaCount) 1 -}}
{{- $many = printf "KEDA scales it up to %v pods" .Values.keda.maxReplicaCount -}}
{{- end -}}
{{- else if .Values.autoscaling.enabled -}}
{{- if gt (int .Values.autoscaling.maxReplicas) 1 -}}
{{- $many = printf "the HPA scales it up to %v pods" .Values.autoscaling.maxReplicas -}}
{{- end -}}
{{- else if gt (int .Values.replicaCount) 1 -}}
{{- $many = printf "replicaCount is %v" .Values.replicaCount -}}
{{- end -}}
{{- if $many -}}
{{- fail (printf "detect.correlation.mode is in_process and %s: each pod would count only the events it sees, so a Sigma correlation split between pods would not fire. Set detect.correlation.mode: dynamodb (with a table) for counts shared by every pod, or detect.correlation.acknowledgePerPodCounts: true if per-pod counts are what you want (or your rules have no correlations)." $many) -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* The [detect] section from `detect` (empty when it names no rules). */}}
{{- define "trailhose.detectDict" -}}
{{- $d := default dict . -}}
{{- $det := dict -}}
{{- if $d.rules -}}
{{- $paths := list -}}
{{- $names := list -}}
{{- range $d.rules -}}
{{- $sources := 0 -}}
{{- if .configMap }}{{ $sources = add1 $sources }}{{ end -}}
{{- if .volume }}{{ $sources = add1 $sources }}{{ end -}}
{{- if .path }}{{ $sources = add1 $sources }}{{ end -}}
{{- if or (not .name) (ne (int $sources) 1) -}}
{{- fail (printf "detect.rules: each entry needs a name and exactly one of configMap, volume, path (%v)" .) -}}
{{- end -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" .name) -}}
{{- fail (printf "detect.rules: name %q must be a DNS label (lower-case letters, digits, -)" .name) -}}
{{- end -}}
{{- if has .name $names -}}
{{- fail (printf "detect.rules: name %q is used twice" .name) -}}
{{- end -}}
{{- if and .path (not (hasPrefix "/" .path)) -}}
{{- fail (printf "detect.rules.%s.path must be absolute" .name) -}}
{{- end -}}
{{- if and .configMap (not .configMap.name) -}}
{{- fail (printf "detect.rules.%s.configMap needs the ConfigMap's name" .name) -}}
{{- end -}}
{{- $names = append $names .name -}}
{{- $paths = append $paths (include "trailhose.rulePath" .) -}}
{{- end -}}
{{- $_ := set $det "rules" $paths -}}
{{- range $k := list "annotate" "skip_invalid" "reload_secs" "fields" "placeholders" -}}
{{- if and (hasKey $d $k) (not (kindIs "invalid" (index $d $k))) }}{{ $_ := set $det $k (index $d $k) }}{{ end -}}
{{- end -}}
{{- $corr := dict -}}
{{- range $k, $val := (omit (default dict $d.correlation) "acknowledgePerPodCounts") -}}
{{- if not (kindIs "invalid" $val) }}{{ $_ := set $corr $k $val }}{{ end -}}
{{- end -}}
{{- if $corr }}{{ $_ := set $det "correlation" $corr }}{{ end -}}
{{- if $d.alerts -}}
{{- $alerts := list -}}
{{- range $i, $a := $d.alerts -}}
{{- $targets := 0 -}}
{{- range $k := list "target" "target_env" "targetSecret" -}}
{{- if index $a $k }}{{ $targets = add1 $targets }}{{ end -}}
{{- end -}}
{{- if or (not $a.kind) (ne (int $targets) 1) -}}
{{- fail (printf "detect.alerts: each output needs kind and exactly one of target, target_env, targetSecret (%v)" (omit $a "target")) -}}
{{- end -}}
{{- if $a.targetSecret -}}
{{- if not (and $a.targetSecret.name $a.targetSecret.key) -}}
{{- fail (printf "detect.alerts[%d].targetSecret needs the Secret's name and key" $i) -}}
{{- end -}}
{{- $alerts = append $alerts (set (omit $a "targetSecret") "target_env" (include "trailhose.alertTargetEnv" $i)) -}}
{{- else -}}
{{- $alerts = append $alerts $a -}}
{{- end -}}
{{- end -}}
{{- $_ := set $det "alerts" $alerts -}}
{{- end -}}
{{- else if $d.alerts -}}
{{- fail "detect.alerts needs detect.rules: name where the Sigma rules come from" -}}
{{- end -}}
{{- toJson $det -}}
{{- end }}

{{/*
The path trailhose reads an enrichment table from: a ConfigMap mounted as a directory per table
(not subPath, so that Kubernetes' updates reach the pod and the table reloads), an s3:// URL
trailhose reads itself (and follows by ETag), or a file in a volume of extraVolumes.
*/}}
{{- define "trailhose.tablePath" -}}
{{- $t := . -}}
{{- if $t.configMap -}}
{{- printf "%s/%s/%s" (include "trailhose.tablesDir" .) $t.name $t.configMap.key -}}
{{- else if $t.url -}}
{{- $t.url -}}
{{- else -}}
{{- $t.path -}}
{{- end -}}
{{- end }}

{{/*
Where trailhose loads a transform module from: a ConfigMap mounted per module, an s3:// URL
trailhose reads itself (and follows by ETag), or a file in a volume of extraVolumes.
*/}}
{{- define "trailhose.transformPath" -}}
{{- $t := . -}}
{{- if $t.configMap -}}
{{- printf "/var/lib/trailhose/modules/%s/%s" $t.name $t.configMap.key -}}
{{- else if $t.url -}}
{{- $t.url -}}
{{- else -}}
{{- $t.path -}}
{{- end -}}
{{- end }}

{{/*
The whole trailhose.toml as a dict: `config` plus the mode's source, the allowlist, the server
section the probes and Service depend on, the GeoIP paths and the transforms.
*/}}
{{- define "trailhose.configDict" -}}
{{- $v := .Values -}}
{{- if not (has $v.mode (list "sqs" "kinesis")) -}}
{{- fail (printf "mode must be sqs or kinesis, not %q" $v.mode) -}}
{{- end -}}
{{- $cfg := deepCopy (default dict $v.config) -}}
{{- $source := dict "buckets" (default list $v.buckets) -}}
{{- if eq $v.mode "sqs" -}}
{{- $_ := set $source "sqs" (deepCopy $v.sqs) -}}
{{- else -}}
{{- $_ := set $source "kinesis" (deepCopy $v.kinesis) -}}
{{- end -}}
{{- $_ := set $cfg "source" $source -}}
{{- $_ := set $cfg "server" (dict "listen" (printf "0.0.0.0:%d" (int $v.service.port)) "shutdown_grace_secs" (int $v.shutdownGraceSeconds)) -}}
{{- if ne $v.geoip.source "none" -}}
{{- if not (has $v.geoip.source (list "geoipupdate" "volume")) -}}
{{- fail (printf "geoip.source must be none, geoipupdate or volume, not %q" $v.geoip.source) -}}
{{- end -}}
{{- $geo := default dict (get $cfg "geoip") -}}
{{- $_ := set $geo "city_db" (printf "%s/%s" (include "trailhose.geoipDir" .) $v.geoip.cityDb) -}}
{{- if $v.geoip.asnDb -}}
{{- $_ := set $geo "asn_db" (printf "%s/%s" (include "trailhose.geoipDir" .) $v.geoip.asnDb) -}}
{{- end -}}
{{- $_ := set $cfg "geoip" $geo -}}
{{- end -}}
{{- if $v.transforms -}}
{{- $list := list -}}
{{- range $v.transforms -}}
{{- $sources := 0 -}}
{{- if .configMap }}{{ $sources = add1 $sources }}{{ end -}}
{{- if .url }}{{ $sources = add1 $sources }}{{ end -}}
{{- if .path }}{{ $sources = add1 $sources }}{{ end -}}
{{- if or (not .name) (ne (int $sources) 1) -}}
{{- fail (printf "transforms: each entry needs a name and exactly one of configMap, url, path (%v)" .) -}}
{{- end -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" .name) -}}
{{- fail (printf "transforms: name %q must be a DNS label (lower-case letters, digits, -)" .name) -}}
{{- end -}}
{{- if and .url (not (regexMatch "^s3://[a-z0-9][a-z0-9.-]*/[^'\\s]+$" .url)) -}}
{{- fail (printf "transforms.%s.url must be an s3://bucket/key URL without quotes or spaces" .name) -}}
{{- end -}}
{{- $t := dict "name" .name "path" (include "trailhose.transformPath" .) -}}
{{- if .config -}}
{{- $c := dict -}}
{{- range $k, $val := .config }}{{ $_ := set $c $k (toString $val) }}{{ end -}}
{{- $_ := set $t "config" $c -}}
{{- end -}}
{{- $src := . -}}
{{- range $k := list "fuel" "timeout_ms" "max_memory_mb" "max_output_bytes" "on_failure" "max_attempts" "retry_fallback" "tables" "region" "endpoint_url" "force_path_style" -}}
{{- if and (hasKey $src $k) (not (kindIs "invalid" (index $src $k))) }}{{ $_ := set $t $k (index $src $k) }}{{ end -}}
{{- end -}}
{{- $list = append $list $t -}}
{{- end -}}
{{- $_ := set $cfg "transforms" $list -}}
{{- /* Compiled native code is cached on a volume only the trailhose container mounts; trailhose
  creates the 0700 subdirectory itself (an emptyDir's own root is world-writable). */ -}}
{{- $pipeline := default dict (get $cfg "pipeline") -}}
{{- if not (hasKey $pipeline "transform_cache_dir") -}}
{{- $_ := set $pipeline "transform_cache_dir" "/var/cache/trailhose/wasm" -}}
{{- end -}}
{{- $_ := set $cfg "pipeline" $pipeline -}}
{{- end -}}
{{- if $v.tables -}}
{{- $enrich := default dict (get $cfg "enrich") -}}
{{- $list := list -}}
{{- range $v.tables -}}
{{- $sources := 0 -}}
{{- if .configMap }}{{ $sources = add1 $sources }}{{ end -}}
{{- if .url }}{{ $sources = add1 $sources }}{{ end -}}
{{- if .path }}{{ $sources = add1 $sources }}{{ end -}}
{{- if or (not .name) (ne (int $sources) 1) -}}
{{- fail (printf "tables: each entry needs a name and exactly one of configMap, url, path (%v)" .) -}}
{{- end -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" .name) -}}
{{- fail (printf "tables: name %q must be a DNS label (lower-case letters, digits, -)" .name) -}}
{{- end -}}
{{- $t := dict "name" .name "path" (include "trailhose.tablePath" .) -}}
{{- $src := . -}}
{{- range $k := list "format" "key" "match" "max_bytes" "region" "endpoint_url" "force_path_style" -}}
{{- if and (hasKey $src $k) (not (kindIs "invalid" (index $src $k))) }}{{ $_ := set $t $k (index $src $k) }}{{ end -}}
{{- end -}}
{{- $list = append $list $t -}}
{{- end -}}
{{- $_ := set $enrich "tables" (concat (default list (get $enrich "tables")) $list) -}}
{{- $_ := set $cfg "enrich" $enrich -}}
{{- end -}}
{{- $detect := include "trailhose.detectDict" $v.detect | fromJson -}}
{{- if $detect }}{{ $_ := set $cfg "detect" $detect }}{{ end -}}
{{- toJson $cfg -}}
{{- end }}

{{/* A TOML key: bare when it can be, else a quoted (JSON = TOML basic) string. */}}
{{- define "trailhose.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end -}}
{{- end }}

{{- define "trailhose.isTableList" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) (kindIs "map" (index . 0)) }}true{{ end -}}
{{- end }}

{{/*
Renders a dict as TOML. Scalars and arrays of scalars become `key = <JSON literal>` (JSON
strings, numbers, booleans and arrays of them are valid TOML), nested dicts [tables], lists of
dicts [[arrays of tables]]. Nulls are left out so trailhose's defaults apply. Keys of one table
come before its sub-tables, as TOML requires.
*/}}
{{- define "trailhose.toml" -}}
{{- $prefix := .prefix -}}
{{- range $k, $v := .table }}
{{- if not (or (kindIs "invalid" $v) (kindIs "map" $v) (include "trailhose.isTableList" $v)) }}
{{ include "trailhose.tomlKey" $k }} = {{ toJson $v }}
{{- end }}
{{- end }}
{{- range $k, $v := .table }}
{{- $name := include "trailhose.tomlKey" $k }}
{{- if $prefix }}{{ $name = printf "%s.%s" $prefix $name }}{{ end }}
{{- if kindIs "map" $v }}

[{{ $name }}]
{{- include "trailhose.toml" (dict "prefix" $name "table" $v) }}
{{- else if include "trailhose.isTableList" $v }}
{{- range $v }}

[[{{ $name }}]]
{{- include "trailhose.toml" (dict "prefix" $name "table" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "trailhose.configToml" -}}
# Rendered by the trailhose Helm chart from its values; edit the values, not this file.
{{- include "trailhose.toml" (dict "prefix" "" "table" (include "trailhose.configDict" . | fromJson)) }}
{{- end }}

{{/*
The volume of a table's or a module's ConfigMap: `<prefix>-<name>` while that is a DNS label
(63 characters at most); a longer one is cut and ends in a hash of the whole name, so that two
long names sharing their first characters do not get the same volume.
*/}}
{{- define "trailhose.volumeName" -}}
{{- $full := printf "%s-%s" .prefix .name -}}
{{- if le (len $full) 63 -}}
{{- $full -}}
{{- else -}}
{{- printf "%s-%s" ($full | trunc 54 | trimSuffix "-") (.name | sha256sum | trunc 8) -}}
{{- end -}}
{{- end -}}
