"""The running program of the dev loop: loads `counter`, serves the CLI, keeps calling it.

    cd examples/devloop
    nativereload build              # -> build/modules/counter.so
    python serve.py &               # prints what counter says, twice a second
    $EDITOR counter.c               # make version() return 2
    nativereload build && nativereload reload counter
    nativereload status             # generation 2, the old image drained; step()'s total carried on
"""

import logging
import threading
import time

import nativereload

logging.basicConfig(level=logging.INFO, format="%(message)s")

reg = nativereload.Registry(path=["build/modules"])
counter = reg.load("counter")  # the declarations come from counter.h, embedded in counter.so
server = reg.serve()  # $XDG_RUNTIME_DIR/nativereload/<pid>.sock: the CLI finds it by itself
print(f"serving on {server.path}; Ctrl-C to stop", flush=True)

version, step = counter.version, counter.step  # Func handles: they follow reloads
failed = 0


def busy() -> None:
    """Calls as fast as it can, to show that a reload loses no call."""
    global failed
    while True:
        try:
            step(1)
        except Exception:
            failed += 1


threading.Thread(target=busy, daemon=True).start()
try:
    while True:
        print(f"generation {counter.generation}: version() = {version()}, step(0) = {step(0)}, "
              f"failed calls: {failed}", flush=True)
        time.sleep(0.5)
except KeyboardInterrupt:
    pass
finally:
    reg.close()
