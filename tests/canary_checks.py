"""Python checks the canary tests name as canary="canary_checks:NAME" (run in the canary process)."""


def accept(module):
    assert module.lifecycle_version() in (1, 2)


def refuse(module):
    assert module.lifecycle_version() == 99, "canary says no"
