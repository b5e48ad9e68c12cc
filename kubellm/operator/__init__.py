"""The kopf operator that turns InferenceServices into runtime Deployments, Services and HPAs."""
