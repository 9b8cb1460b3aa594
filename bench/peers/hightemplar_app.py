"""High-templar 3.1 peer for scripts/bench-peers.sh, served by Hypercorn:

    HT_API_URL=http://127.0.0.1:P/api/ HT_AMQP_HOST=127.0.0.1:Q HT_AMQP_USER=u HT_AMQP_PASS=p \
        python hightemplar_app.py R

The WebSocket is ws://127.0.0.1:R/ws/; the app it asks is bench/peers/mock_app.py; publications
come through RabbitMQ (exchange `hightemplar`, routing key `*`), as in HT's deployments.
"""

import logging
import os

from high_templar.main import create_app


class Settings:
    API_URL = os.environ["HT_API_URL"]
    CONNECTION_HEADERS = {}
    RABBITMQ = {
        "enabled": True,
        "exchange_name": "hightemplar",
        "username": os.environ["HT_AMQP_USER"],
        "password": os.environ["HT_AMQP_PASS"],
        "host": os.environ["HT_AMQP_HOST"],
    }


app = create_app(Settings)
app.logger.setLevel(logging.WARNING)
logging.getLogger().setLevel(logging.WARNING)


def main():
    """Serves `app` in this process (the `hypercorn` command forks a worker, whose CPU and
    memory the benchmark would then have to find): python hightemplar_app.py PORT."""
    import asyncio
    import signal
    import sys

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = ["127.0.0.1:{}".format(int(sys.argv[1]))]
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await serve(app, config, shutdown_trigger=stop.wait)

    asyncio.run(run())


if __name__ == "__main__":
    main()
