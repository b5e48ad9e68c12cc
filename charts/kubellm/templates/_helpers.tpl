{{- define "kubellm.labels" -}}
app.kubernetes.io/name: kubellm-operator
{{- end -}}
