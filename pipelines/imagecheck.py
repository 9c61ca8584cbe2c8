"""`catversion batch --validate-only` image checks as a Ray job: every image fetched, decoded and
hashed once, in parallel tasks across the cluster, with a progress bar on the driver."""

from __future__ import annotations

from collections.abc import Callable

from .manifest import ImageRef, check_image

CHUNK = 32  # images per task: enough to hide a task's overhead, small enough to spread a manifest


def _check_chunk(refs: list[ImageRef]) -> list[tuple[str | None, str | None]]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:  # fetching is I/O: overlap it within the task
        return list(pool.map(check_image, refs))


def ray_checker(quiet: bool = False) -> Callable[[list[ImageRef]], list[tuple[str | None, str | None]]]:
    """A `validate_manifest` checker that runs on the Ray cluster this process has joined."""

    def check(refs: list[ImageRef]) -> list[tuple[str | None, str | None]]:
        import ray

        from catversion import progress

        task = ray.remote(num_cpus=1, max_retries=3)(_check_chunk)
        chunks = [refs[i:i + CHUNK] for i in range(0, len(refs), CHUNK)]
        futures = {task.remote(chunk): n for n, chunk in enumerate(chunks)}
        outcomes: list = [None] * len(chunks)
        with progress.bar(len(refs), "checking images", "img", quiet) as bar:
            waiting = list(futures)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                for ref in done:
                    n = futures[ref]
                    outcomes[n] = ray.get(ref)
                    bar.update(len(chunks[n]))
        return [outcome for chunk in outcomes for outcome in chunk]

    return check
