"""``python -m harness.replay RESULT.json ...``: Tables 3 and 4 of saved replays, in Markdown."""

import sys

from harness.replay.report import main

main(sys.argv[1:])
