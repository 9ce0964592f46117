"""Sentry scopes that follow the work into thread pools (``pip install ctxprop[sentry]``).

Sentry keeps tags, user and breadcrumbs in an isolation scope and a current scope, mutated in place. A
task on a plain pool sees whatever scope its thread last had; a bare context copy shares the submitter's
scope objects, so a task's ``set_tag`` lands in the submitter's scope. With ``CtxpropIntegration``, each
ctxprop capture forks both Sentry scopes: every task sees its submitter's tags and keeps its own changes.

Runs as is: events are kept in a list by an in-process transport instead of being sent to Sentry.
"""

from __future__ import annotations

from typing import Any, ClassVar

import sentry_sdk
from sentry_sdk.transport import Transport

import ctxprop
from ctxprop._sentry import CtxpropIntegration


class KeepEvents(Transport):
    """Keeps events in memory (a real app uses Sentry's own transport)."""

    events: ClassVar[list[dict[str, Any]]] = []

    def capture_envelope(self, envelope: Any) -> None:
        event = envelope.get_event()
        if event is not None:
            self.events.append(event)


def process(job: str, item: int) -> None:
    sentry_sdk.set_tag("item", item)  # the task's own tag: must stay on this task's events
    sentry_sdk.capture_message(f"{job}: item {item} needs attention")


def main() -> None:
    sentry_sdk.init(
        dsn="https://public@sentry.example/1",  # never contacted: the transport keeps events in memory
        transport=KeepEvents(),
        default_integrations=False,
        integrations=[CtxpropIntegration()],
    )
    jobs = [f"import-{i}" for i in range(5)]
    with ctxprop.ContextAwareThreadPoolExecutor(max_workers=2) as pool:
        futures = []
        for i, job in enumerate(jobs):
            with sentry_sdk.isolation_scope():
                sentry_sdk.set_tag("job", job)
                futures.append(pool.submit(process, job, i))
        for f in futures:
            f.result()
    sentry_sdk.capture_message("all jobs submitted")
    by_message = {e["message"]: e.get("tags", {}) for e in KeepEvents.events}
    good = 0
    for i, job in enumerate(jobs):
        tags = by_message[f"{job}: item {i} needs attention"]
        good += tags == {"job": job, "item": i}
        print(f"{job}: event tags {tags}")
    main_tags = by_message["all jobs submitted"]
    print(f"main thread's event tags: {main_tags}")
    verdict = "none leaked back" if not main_tags else f"LEAKED {main_tags}"
    print(f"{good}/{len(jobs)} Sentry events carry their own job's tags; {verdict}")


if __name__ == "__main__":
    main()
