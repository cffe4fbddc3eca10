"""What both fault suites share: the stage key, the margin on time bounds,
the ``log_config`` they send and the ``[faults]`` lines the README quotes.

It imports no engine module, so the end-to-end suite can use it against the
zipapp.
"""

KEY = "stage/le"
# Slack added to every bound computed from deadlines, for a loaded machine.
MARGIN = 1.0


def figure(text, *args):
    """Print one measured figure so CI output keeps it."""
    print("\n[faults] " + (text % args if args else text), flush=True)


def log_config(service, **extra):
    """The ``log_config`` that points the engine at ``service``."""
    config = {"url": service.url, "account_id": "acct", "token": service.token}
    config.update(extra)
    return config


def outs(lines):
    """The ``out`` of each line."""
    return [line["out"] for line in lines]
