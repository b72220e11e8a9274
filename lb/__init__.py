"""lb: an asyncio emulator of a Network Load Balancer that knows its targets only as addresses."""
