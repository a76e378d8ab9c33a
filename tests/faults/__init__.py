"""Fault probes: the whole stack under broker drops, killed processes, full disks and
slow clients, judged by what a user would see (``make faults`` runs them longer)."""
