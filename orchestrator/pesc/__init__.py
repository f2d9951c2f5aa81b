"""PESC: the dense FFN becomes a mixture of adapter experts, trained on all tasks at once.

The unified alternative the report compares the flock against. It runs on the flock's own
Ray Train workers, base and prefix cache (:mod:`orchestrator.pesc.stage`); the layer is
:mod:`models.moe`.
"""
