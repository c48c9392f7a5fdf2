{{/*
Labels that select the agent's Pods (DaemonSet selector).
*/}}
{{- define "cnlb-vpc-ipam.selectorLabels" -}}
app.kubernetes.io/name: vpc-ipam-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of every object. No helm.sh/chart or managed-by label: with the
default values the rendering is exactly deploy/vpc-ipam/.
*/}}
{{- define "cnlb-vpc-ipam.labels" -}}
{{ include "cnlb-vpc-ipam.selectorLabels" . }}
app.kubernetes.io/component: ipam-agent
app.kubernetes.io/part-of: cnlb
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/*
The image of both containers.
*/}}
{{- define "cnlb-vpc-ipam.image" -}}
"{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
{{- end }}
