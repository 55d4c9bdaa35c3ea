"""`python -m orca_oracle CONFIG.json READY_FILE`: the oracle as a subprocess.

CONFIG holds {"models": {model: OracleSettings fields}, "sources": [parquet paths],
"api_key_env": name or null}. The base URL is written to READY_FILE once the
server listens (the key, if any, is read from the environment, never the file).
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

from orca_core.recipe.models import OracleSettings
from orca_oracle.server import serve


def exit_with_parent(parent: int) -> None:
    """A killed driver (kill -9) cannot stop its oracle: the oracle stops itself when orphaned."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    exit_with_parent(os.getppid())
    config = json.loads(Path(sys.argv[1]).read_text())
    models = {name: OracleSettings(**settings) for name, settings in config["models"].items()}
    key_env = config.get("api_key_env")
    serve(host="127.0.0.1", port=0, models=models, sources=[Path(p) for p in config["sources"]],
          api_key=os.environ.get(key_env) if key_env else None, ready_file=Path(sys.argv[2]))


if __name__ == "__main__":
    main()
