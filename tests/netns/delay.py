#!/usr/bin/env python3
"""A TCP proxy that delays what it forwards, in both directions, for tests on a kernel
without sch_netem. Each chunk read is sent on after a uniformly random 10-30 ms (20 ms
+- 10 ms), never before the chunk read ahead of it, so the byte stream stays in order.
SIGUSR1 turns the delay on, SIGUSR2 off (it starts off).

Usage: delay.py LISTEN_HOST LISTEN_PORT TO_HOST TO_PORT   (prints "listening" when ready)
"""
import asyncio
import random
import signal
import sys

DELAY = [False]


async def pipe(reader, writer):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def send():
        while True:
            at, data = await queue.get()
            if data is None:
                writer.close()
                return
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    last = 0.0
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            delay = random.uniform(0.010, 0.030) if DELAY[0] else 0.0
            last = max(loop.time() + delay, last)
            await queue.put((last, data))
    except (ConnectionError, OSError):
        pass
    await queue.put((0.0, None))
    try:
        await sender
    except (ConnectionError, OSError):
        pass


async def main():
    lhost, lport, thost, tport = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: DELAY.__setitem__(0, True))
    loop.add_signal_handler(signal.SIGUSR2, lambda: DELAY.__setitem__(0, False))

    async def handle(cr, cw):
        try:
            sr, sw = await asyncio.open_connection(thost, tport)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, sw), pipe(sr, cw))

    server = await asyncio.start_server(handle, lhost, lport)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
