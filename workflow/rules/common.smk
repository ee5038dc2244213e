# The resolved study config, written once per change: every job reads this file, so the
# jobs see exactly the config Snakemake validated (including --config overrides).
import hashlib
import json
import sys
from pathlib import Path

import yaml
from dbp.config import to_dict

RESOLVED = to_dict(STUDY)
STUDY_CONFIG = f"{RESULTS}/config.yaml"
DBP = f"{sys.executable} -m dbp"  # the dbp CLI of the Python running Snakemake (no PATH needed)


rule study_config:
    output:
        STUDY_CONFIG,
    params:
        digest=hashlib.sha256(json.dumps(RESOLVED, sort_keys=True).encode()).hexdigest(),
    run:
        from dbp.measure import atomic_write_text

        atomic_write_text(output[0], yaml.safe_dump(RESOLVED, sort_keys=False))
