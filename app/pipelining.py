"""Auto-pipelining (as ioredis' `enableAutoPipelining`): the single commands that concurrent
requests send to one Redis server in one event-loop turn go out together, in one write on one
pooled connection, and their replies are read back in order. Each command stays its own command
(each EVALSHA its own atomic script call, its own reply or error): only the socket work, and
redis-py's per-command pool and retry bookkeeping, are shared, in the service and in Redis,
which reads the whole batch at once.

Errors are what redis-py's `execute_command` raises, command by command: an error reply
(ResponseError, NoScriptError, BUSY, ...) belongs to its own command alone; a connection error
or a timeout (redis-py's `socket_timeout`, per reply as in its own pipelines) fails every
command of the batch not yet answered, and redis-py has then closed the connection, so the next
batch gets a fresh one. A request cancelled while its command is in flight (its client went
away) only stops waiting: the batch still reads that reply, so replies never shift to the wrong
commands.
"""

import asyncio
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError
from redis.typing import EncodableT

# A command queued for the next batch: its name and arguments, and where its reply goes.
_Queued = tuple[str, tuple[EncodableT, ...], "asyncio.Future[Any]"]


class CommandSender(Protocol):
    """What sends one command and returns its parsed reply: redis-py's clients, AutoPipeline."""

    async def execute_command(self, name: str, *args: EncodableT) -> Any: ...


class AutoPipeline:
    """Sends single commands to one Redis server (a `Redis` client's connection pool), those
    queued in one event-loop turn as one batch: one connection, one write, replies in order."""

    def __init__(self, client: Redis) -> None:
        self._pool = client.connection_pool
        self._callbacks = client.response_callbacks  # the replies parsed as the client would
        self._queued: list[_Queued] = []
        self._batches: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    async def execute_command(self, name: str, *args: EncodableT) -> Any:
        """The command's reply, parsed as `Redis.execute_command` parses it; raises what it
        would raise."""
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        self._queued.append((name, args, reply))
        if len(self._queued) == 1:
            batch = loop.create_task(self._send_queued())
            self._batches.add(batch)
            batch.add_done_callback(self._batches.discard)
        return await reply

    async def _send_queued(self) -> None:
        # A task first runs in the event-loop turn after the one that created it: by then every
        # request that ran in that turn has queued its command.
        queued, self._queued = self._queued, []
        try:
            connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                await self._send(connection, queued)
            finally:
                await self._pool.release(connection)
        except asyncio.CancelledError:  # the service is stopping
            for _, _, reply in queued:
                reply.cancel()
            raise
        except Exception as error:  # the connection failed: no later reply can be read
            for _, _, reply in queued:
                if not reply.done():
                    reply.set_exception(error)

    async def _send(self, connection: AbstractConnection, queued: list[_Queued]) -> None:
        sent: list[_Queued] = []
        packed: list[bytes] = []
        for name, args, reply in queued:
            if reply.done():  # its request was cancelled before the batch went out
                continue
            try:
                packed += connection.pack_command(name, *args)
            except Exception as error:  # a bad argument (a bug of ours): this command only
                reply.set_exception(error)
                continue
            sent.append((name, args, reply))
        if not sent:
            return
        await connection.send_packed_command(b"".join(packed))
        try:
            for name, _, reply in sent:
                try:
                    result = await connection.read_response()
                except ResponseError as error:  # Redis' refusal of this command alone
                    result = error
                if not reply.done():  # else its request was cancelled: the reply is dropped
                    self._resolve(reply, name, result)
        except BaseException:
            # Replies left unread would answer the next batch's commands (after a connection
            # error or a timeout redis-py has closed the connection already).
            await connection.disconnect(nowait=True)
            raise

    def _resolve(self, reply: "asyncio.Future[Any]", name: str, result: Any) -> None:
        if isinstance(result, ResponseError):
            reply.set_exception(result)
            return
        callback = self._callbacks.get(name)
        try:
            reply.set_result(result if callback is None else callback(result))
        except Exception as error:  # a reply redis-py cannot parse: this command only
            reply.set_exception(error)
