import signal
import sys

from atom_jax.generate.cli import main


def _terminate(signum, frame):
    # SIGTERM (a job scheduler's stop) takes the Ctrl-C path: fsync, summary, exit 130.
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
