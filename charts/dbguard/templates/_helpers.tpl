{{/* Names and labels shared by the templates. */}}

{{- define "dbguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dbguard.fullname" -}}
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

{{- define "dbguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dbguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dbguard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "dbguard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dbguard
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "dbguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dbguard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dbguard.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "dbguard.proxyImage" -}}
{{- default (include "dbguard.image" .) .Values.proxy.image }}
{{- end }}

{{/* The Mutating/ValidatingWebhookConfiguration the operator writes (and only it may change). */}}
{{- define "dbguard.webhookConfigName" -}}
{{- default (include "dbguard.fullname" .) .Values.operator.webhookConfigName }}
{{- end }}

{{- define "dbguard.webhookServiceName" -}}
{{- printf "%s-webhook" (include "dbguard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Where the operator keeps its own webhook CA and certificate (webhook.certs.mode=operator). */}}
{{- define "dbguard.operatorTLSSecret" -}}
{{- printf "%s-webhook-tls" (include "dbguard.webhookConfigName" .) }}
{{- end }}

{{/* Where cert-manager writes the serving certificate (webhook.certs.mode=certManager). */}}
{{- define "dbguard.certManagerSecret" -}}
{{- printf "%s-webhook-cert" (include "dbguard.fullname" .) }}
{{- end }}

{{- define "dbguard.opaName" -}}
{{- printf "%s-opa" (include "dbguard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dbguard.certManager" -}}
{{- if eq .Values.webhook.certs.mode "certManager" }}true{{ end }}
{{- end }}

{{/* The ClusterRole the operator binds to each DatabaseAccess's ServiceAccounts; its name is fixed in
     the operator (operator/dbguard/controller/access.py, TOKENREVIEW_ROLE). */}}
{{- define "dbguard.tokenReviewRole" -}}
dbguard-tokenreview
{{- end }}

{{/* The shared gateway (gateway.enabled): its name, namespace and image. */}}
{{- define "dbguard.gatewayName" -}}
{{- printf "%s-gateway" (include "dbguard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dbguard.gatewayNamespace" -}}
{{- default .Release.Namespace .Values.gateway.namespace }}
{{- end }}

{{- define "dbguard.gatewayImage" -}}
{{- default (include "dbguard.proxyImage" .) .Values.gateway.image }}
{{- end }}

{{/* A PodDisruptionBudget's budget: exactly one of maxUnavailable and minAvailable.
     Called with (list VALUES "values.path"). */}}
{{- define "dbguard.disruptionBudget" -}}
{{- $pdb := index . 0 }}
{{- $path := index . 1 }}
{{- $max := hasKey $pdb "maxUnavailable" }}
{{- $min := hasKey $pdb "minAvailable" }}
{{- if and $max $min }}
{{- fail (printf "%s: set one of maxUnavailable and minAvailable (--set %s.maxUnavailable=null to use minAvailable)" $path $path) }}
{{- else if $max }}
maxUnavailable: {{ $pdb.maxUnavailable | toYaml }}
{{- else if $min }}
minAvailable: {{ $pdb.minAvailable | toYaml }}
{{- else }}
{{- fail (printf "%s: set maxUnavailable or minAvailable" $path) }}
{{- end }}
{{- end }}
