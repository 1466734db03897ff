"""`python -m app`: run the service with uvicorn, one worker per core.

With no REDIS_URL, the embedded redis-server is started here, once, and shared by the workers.
"""

import argparse
import logging.config
import os
import signal
import sys

import uvicorn

from app.embedded import EmbeddedRedis, EmbeddedRedisError
from app.logs import logging_config
from app.metrics import multiprocess_directory, remove_multiprocess_directory
from app.settings import Settings


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Run the EMA service: uvicorn workers behind one port, and with no "
        "REDIS_URL a private redis-server with its data in EMA_DATA_DIR.",
        epilog="Every setting is an environment variable (REDIS_URL, EMA_*): see the README's "
        "Configuration section. The options below override EMA_HOST, EMA_PORT, EMA_WORKERS.",
    )
    parser.add_argument("--host", help="address to listen on (EMA_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (EMA_PORT, default 8000)")
    parser.add_argument(
        "--workers", type=int, help="worker processes (EMA_WORKERS, default: one per core)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    arguments = _arguments(argv)
    for option in ("host", "port", "workers"):
        given = getattr(arguments, option)
        if given is not None:
            # The workers build their own Settings from the environment: it carries the option.
            os.environ[f"EMA_{option.upper()}"] = str(given)
    settings = Settings()
    log_config = logging_config(settings.log_level, settings.log_format)
    logging.config.dictConfig(log_config)
    # uvicorn re-raises the SIGTERM it handled once it has shut down: exit normally then, so
    # that the embedded Redis below is stopped rather than orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    embedded = None
    if settings.redis_url is None:
        embedded = EmbeddedRedis(settings.data_dir)
        try:
            os.environ["REDIS_URL"] = embedded.start()
        except EmbeddedRedisError as error:
            sys.exit(f"error: {error}")
    metrics_directory = multiprocess_directory(settings.workers)  # before workers start
    try:
        uvicorn.run(
            "app.main:app",
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_config=log_config,
            access_log=False,
            # uvicorn's httptools protocol with bounds on header size and request time.
            http="app.protocol:BoundedHttpProtocol",
        )
    finally:
        remove_multiprocess_directory(metrics_directory)
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    main()
