"""Entry point for `python -m operators`."""

from operators.core.startup import exit_process, start_process

start_process()

from operators.cli import main  # noqa: E402  (after the probe: importing a step may build Arrow arrays)

exit_process(main())
