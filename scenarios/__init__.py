"""scenarios: scenario files, the runner that wires backends to the load balancer, traffic, outcomes and the CLI."""
