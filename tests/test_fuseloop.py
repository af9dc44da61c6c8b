"""The FUSE worker loop's read lock (edge/fuseloop.py), driven by trio tasks
that behave like pyfuse3's workers: take the lock, wait for input, release it,
handle a request, come back."""

import trio
import trio.testing

from repdisk.edge import fuseloop


def run(fn):
    async def main():
        with fuseloop.installed() as lock:
            await fn(lock)

    trio.run(main)


def finishes_without_yielding(coro) -> bool:
    try:
        coro.send(None)
    except StopIteration:
        return True
    coro.close()
    return False


def test_a_free_lock_is_taken_and_given_back_without_a_yield():
    async def body(lock):
        assert finishes_without_yielding(lock.__aenter__())
        assert lock._owner is trio.lowlevel.current_task()
        assert finishes_without_yielding(lock.__aexit__(None, None, None))
        assert lock._owner is None

    run(body)


def test_released_and_taken_back_within_a_step_wakes_no_waiter():
    async def body(lock):
        got = []

        async def waiter():
            async with lock:
                got.append("waiter")

        async with trio.open_nursery() as nursery:
            await lock.__aenter__()
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            before = lock.handoffs
            for _ in range(100):  # a worker whose handlers never block
                await lock.__aexit__(None, None, None)
                await lock.__aenter__()
            assert lock.handoffs == before and got == []
            await lock.__aexit__(None, None, None)
            await trio.sleep(0)  # now this task blocks with the lock free: the waiter gets it
            await trio.testing.wait_all_tasks_blocked()
            assert got == ["waiter"] and lock.handoffs == before + 1

    run(body)


def test_a_worker_that_blocks_hands_the_lock_on():
    async def body(lock):
        order = []
        request = trio.Event()
        reply = trio.Event()

        async def worker(name, handler_waits):
            async with lock:
                order.append(f"{name} waits for a request")
                await request.wait()  # waiting for /dev/fuse, lock held
            order.append(f"{name} handles")
            await handler_waits.wait()  # e.g. a sync write's reply
            order.append(f"{name} done")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker, "A", reply)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(worker, "B", trio.Event())
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["A waits for a request"]  # B is parked on the lock
            before = lock.handoffs
            request.set()
            await trio.testing.wait_all_tasks_blocked()
            # A blocked in its handler with the lock free: B took over the waiting.
            assert order == ["A waits for a request", "A handles", "B waits for a request", "B handles"]
            assert lock.handoffs == before + 1
            reply.set()
            await trio.testing.wait_all_tasks_blocked()
            assert order[-1] == "A done"
            nursery.cancel_scope.cancel()

    run(body)


def test_a_cancelled_waiter_leaves_the_queue():
    async def body(lock):
        async with trio.open_nursery() as nursery:
            await lock.__aenter__()
            nursery.start_soon(lock.__aenter__)
            await trio.testing.wait_all_tasks_blocked()
            assert len(lock._waiters) == 1
            nursery.cancel_scope.cancel()
        await lock.__aexit__(None, None, None)
        assert not lock._waiters and lock._owner is None

    run(body)
