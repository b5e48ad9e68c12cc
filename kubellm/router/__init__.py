"""`kubellm router`: one OpenAI endpoint in front of many InferenceServices (runs from the operator image)."""
