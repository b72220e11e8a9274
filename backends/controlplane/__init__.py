"""The control plane the backends depend on: DNS planner, enactors and an authoritative DNS server."""
