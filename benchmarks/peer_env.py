"""Virtual environments for the peers a benchmark measures us against (img2dataset, MosaicML streaming, litdata).

Their pins clash with ours (img2dataset wants an older pyarrow and albumentations, streaming its own torch range), so
each peer gets its own environment under `.venv-peers/<name>`, created on first use and reused while its requirement
list is unchanged. Only the benchmark's own processes run in it; our code never imports a peer.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".venv-peers"


def peer_python(name: str, requirements: list[str]) -> Path:
    """The Python of the environment `name` with `requirements` installed (from PyPI, the first time)."""
    folder = PEERS / name
    python = folder / "bin" / "python"
    stamp = folder / "requirements.txt"
    wanted = "\n".join(requirements) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"installing {', '.join(requirements)} into {folder} (once)", flush=True)
    venv.EnvBuilder(clear=True, with_pip=True).create(folder)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
        check=True,
        stdout=sys.stderr,
    )
    stamp.write_text(wanted)
    return python
