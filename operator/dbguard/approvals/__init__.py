"""Approvals for risky statements: ApprovalRequests created by the proxy, decided by people.

``decisions`` holds the rules shared by the operator's webhooks and the local store (who may
decide, the phase); ``store`` the request model; ``kube`` and ``local`` the two stores; ``flow``
what a session does with a statement a require-approval rule holds.
"""
