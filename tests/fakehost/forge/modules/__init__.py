"""Stand-in for Forge's `modules` package: the Forge-specific modules here, everything else from
the A1111 stand-in (tests/fakehost/modules), which Forge keeps as is for what we call."""

import os

__path__.append(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "modules"))
