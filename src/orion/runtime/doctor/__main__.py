"""``python -m orion.runtime.doctor --child ID --backend NAME ...``: one probe in a child process.

Importing the package first registers its probes, and any ``--import`` module registers into the same registry."""

import sys

from orion.runtime.doctor import child_main

sys.exit(child_main())
