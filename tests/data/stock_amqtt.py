"""Stock amqtt 0.12.1 as a broker with anonymous login: the baseline the hardening tests must beat.

Prints the bound port on stdout, then serves until killed.
"""

import asyncio
import sys

from amqtt.broker import Broker


async def main() -> None:
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    port = broker._servers["default"].instance.sockets[0].getsockname()[1]  # noqa: SLF001
    print(port, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
