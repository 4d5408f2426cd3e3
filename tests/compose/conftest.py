"""compose.yaml's containers under Podman: collected only by `make compose-test`.

These need Podman, root and several minutes of image builds, so `make test` does not
collect them; `make compose-test` sets PGSCALE_COMPOSE_TEST=1 after preparing Podman
and the images (python -m infra.docker.podman all).
"""

from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("PGSCALE_COMPOSE_TEST") == "1" else ["test_*.py"]
