"""Stand-in for reForge's `modules` package: the modules reForge changed in ways the adapter meets
are here, everything else from the A1111 stand-in (tests/fakehost/modules), which reForge keeps as
is for what we call (sd_hijack's embedding_db and EmbeddingsWithFixes, the text wrappers,
textual_inversion with load_textual_inversion_embeddings(force_reload=False), shared, devices)."""

import os

__path__.append(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "modules"))
