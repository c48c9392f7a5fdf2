{{/*
Labels that select cnlb-ccm's Pods (Deployment selector, PDB, spreading).
*/}}
{{- define "cnlb-ccm.selectorLabels" -}}
app.kubernetes.io/name: cnlb-ccm
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of every object. No helm.sh/chart or managed-by label: with the
default values the rendering is exactly deploy/ccm/.
*/}}
{{- define "cnlb-ccm.labels" -}}
{{ include "cnlb-ccm.selectorLabels" . }}
app.kubernetes.io/component: cloud-controller-manager
app.kubernetes.io/part-of: cnlb
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
