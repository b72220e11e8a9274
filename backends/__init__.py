"""backends: what the load balancer checks: aiohttp backends, a network path before each, an admin API."""
