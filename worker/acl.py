"""The Redis ACL of submitters: enqueue exports and watch them, and nothing else.

Build farms need the Redis URL to submit, but the workers' own access (the default user)
can flush the broker, delete any key, read every queued request and the server's
configuration. A submitter user gets only what ``Client.submit`` and ``Client.snapshot``
use: LPUSH onto the queue (write-only, so queued requests of others cannot be read), the
submission marker, reads of the progress records of an export whose id it knows (no KEYS
or SCAN to find others), and the pub/sub channel of a result. The chart and the compose
file create this user from ``submitter_rules``; docs/security.md explains it.
"""

from __future__ import annotations

import shlex

SUBMITTER_USER = "cacheship-submitter"

#: Connection set-up and the commands the client sends, by what they are for.
_COMMANDS = (
    # connection: redis-py's handshake and health check
    "+ping", "+hello", "+auth", "+select", "+client|setinfo", "+client|setname",
    # submitting: one MULTI with SET (the submission marker) and LPUSH (the message)
    "+multi", "+exec", "+discard", "+set", "+lpush",
    # watching: the export's records, and the channel its states are published on
    "+get", "+mget", "+exists", "+hmget", "+subscribe", "+unsubscribe",
)
#: Keys: ``%W`` write only, ``%R`` read only, ``~`` both (patterns of tasks/fleet/state.py and
#: worker/client.py).
_READABLE = (
    "celery-task-meta-*",
    "cacheship-plan-*",
    "cacheship-outcomes-*",
    "cacheship-ledger-*",
    "cacheship-worker-alive-*",
    "cacheship-worker-seen-*",
)


def submitter_rules(queue: str = "cacheship") -> list[str]:
    """The ACL rules (``ACL SETUSER`` arguments after the user name and password)."""
    return [
        "resetkeys",
        "resetchannels",
        "-@all",
        *_COMMANDS,
        f"%W~{queue}",
        "~cacheship-submitted-*",
        *(f"%R~{pattern}" for pattern in _READABLE),
        "&celery-task-meta-*",
    ]


def submitter_acl_line(password: str, queue: str = "cacheship", user: str = SUBMITTER_USER) -> str:
    """One ``user`` line of an ACL file (or an ``ACL SETUSER`` command's arguments)."""
    return " ".join([user, "on", f">{password}", *submitter_rules(queue)])


def submitter_shell_args(password_variable: str, queue: str = "cacheship") -> str:
    """``--user ...`` for a ``sh -c "exec redis-server ..."`` command line, the password
    read from ``password_variable``: what the chart and the compose file append."""
    rules = " ".join(shlex.quote(rule) for rule in submitter_rules(queue))
    return f'--user {SUBMITTER_USER} on ">${password_variable}" {rules}'
