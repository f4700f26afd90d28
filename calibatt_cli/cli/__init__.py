"""The `calibatt` command line: app.py holds the commands, render.py what they print."""
