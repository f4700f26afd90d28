import sys

try:
    from calibatt_cli.cli.app import run
except KeyboardInterrupt:  # Ctrl-C while the CLI itself is still importing
    print("interrupted; nothing partial was written", file=sys.stderr)
    sys.exit(130)

run()
