"""The dbguard operator (kopf): reconciles GuardrailPolicy, DatabaseAccess and ApprovalRequest,
injects the proxy sidecar and guards approval decisions through admission webhooks."""
