"""The network of the running event loop: where raw sockets and aiohttp connectors come from.

Asyncio already routes every socket it makes (create_server, create_connection, datagram endpoints) through the
event loop, so the loop is how a world's network is injected. Code that drives a raw socket itself asks the
running loop for the same network here, rather than being handed a second object that could disagree with the
loop (a simulated socket on a real loop would never become ready).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from worlds.base import Network
from worlds.real import RealNetwork

_KERNEL = RealNetwork()


def network(loop: asyncio.AbstractEventLoop | None = None) -> Network:
    """The network of `loop` (default: the running loop, if any): a simulated loop's own, else the kernel's.

    Outside a loop there is no simulated world to be in, so that is the kernel's network too."""
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return _KERNEL
    net: Network | None = getattr(loop, "network", None)
    return net if net is not None else _KERNEL


def http_connector(**kwargs: Any) -> aiohttp.TCPConnector:
    """An aiohttp connector on the running loop's network (call it inside the loop)."""
    return network().http_connector(**kwargs)
