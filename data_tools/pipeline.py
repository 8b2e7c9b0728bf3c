"""Run a wave's read tasks over worker processes and hand each shard its results in task order.

A task (one class tar) feeds several shards, and a shard takes results from several
tasks; each shard must receive them in task order (deterministic, byte-identical
shards), but a slow task must hold back only the shards it feeds: others keep being
written and committed. At most ``window`` tasks are in flight or waiting to be written,
which bounds memory to ``window`` tasks' images.
"""

from __future__ import annotations

from collections import defaultdict, deque
from concurrent.futures import FIRST_COMPLETED, Executor, wait
from typing import Callable, Optional

from .reads import ReadTask, Result, read_task


def run_tasks(tasks: list[ReadTask], executor: Optional[Executor], window: int,
              write: Callable[[Result], None], done: Callable[[int], None]) -> None:
    """Read ``tasks`` (in this process when ``executor`` is None); ``write`` each result, ``done(shard)`` at its end."""
    feeds = [sorted({entry.shard for entry in task.entries}) for task in tasks]
    queues: dict[int, deque[int]] = defaultdict(deque)
    for number, shards in enumerate(feeds):
        for shard in shards:
            queues[shard].append(number)
    ready: dict[int, dict[int, list[Result]]] = {}

    def deliver(number: int, results: list[Result]) -> None:
        by_shard: dict[int, list[Result]] = defaultdict(list)
        for result in results:
            by_shard[result.shard].append(result)
        ready[number] = by_shard
        for shard in feeds[number]:
            queue = queues[shard]
            while queue and shard in ready.get(queue[0], {}):
                head = queue.popleft()
                for result in ready[head].pop(shard):
                    write(result)
                if not ready[head]:
                    del ready[head]
            if not queue:
                done(shard)

    if executor is None:
        for number, task in enumerate(tasks):
            deliver(number, read_task(task))
        return
    inflight, pending = {}, iter(enumerate(tasks))
    while True:
        while len(inflight) + len(ready) < window and (item := next(pending, None)) is not None:
            inflight[executor.submit(read_task, item[1])] = item[0]
        if not inflight:
            return
        finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
        for future in finished:
            deliver(inflight.pop(future), future.result())
